// Paged decode attention for CPU: one query token per sequence against its K/V read in
// place from the cache blocks, with an online softmax (no copy, no padding, no mask).
//
// Layout (the same as kernels/reference.py):
//   q, out            [num_seqs, num_heads, head_dim]       rows may be strided, head_dim contiguous
//   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   block_tables      int32 [num_seqs, max_blocks_per_seq]  token t of a sequence lives in
//                     block block_tables[s][t / block_size] at offset t % block_size
//   seq_lens          int32 [num_seqs]                      keys 0 .. seq_lens[s]-1 are read, nothing else
//   window            keys seq_lens[s] - window .. seq_lens[s]-1 only (the query's position is
//                     seq_lens[s]-1, and it sees the last `window` positions including itself,
//                     as transformers' sliding_window_overlay); 0: all of them
// Query head h reads kv head h / G, G = num_heads / num_kv_heads. One task is one sequence;
// it walks its blocks once, and within a block (all heads' K/V, a few KB, in L1) each kv
// head's keys and values are read once for all G query heads that share it.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dtype_cast.h"
#include "softmax_math.h"

namespace {

constexpr int64_t kMaxBlockSize = 128;
constexpr int64_t kLanes = 16;  // fp32 lanes of one AVX-512 register
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

// Blocks are scattered, so the hardware prefetcher stops at every block boundary: while
// one block's key or value row is used, the same row of the next block is requested.
template <typename scalar_t, int64_t D>
inline void prefetch_row(const scalar_t* row) {
  for (int64_t d = 0; d < D; d += 64 / sizeof(scalar_t)) __builtin_prefetch(row + d);
}

// The running softmax of the G query heads that share one kv head. D is compile-time so
// that each dot product and value update is whole vector registers; G (any GQA group) is
// runtime: per key, the G dot products reuse the key row from L1.
template <typename scalar_t, int64_t D>
struct HeadGroup {
  int64_t G = 0;
  std::vector<float> q, acc;  // [G][D]: q pre-scaled by the softmax scale; acc sum of exp(score - m) * v
  std::vector<float> m, l;    // [G]: running max, running sum of exp(score - m)
  std::vector<float> p;       // [G][kMaxBlockSize]: one block's scores, then weights

  explicit HeadGroup(int64_t group) : G(group), q(G * D), acc(G * D), m(G), l(G), p(G * kMaxBlockSize) {}

  void start(const scalar_t* q_rows, int64_t q_head_stride, float scale) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t d = 0; d < D; ++d) {
        q[g * D + d] = to_f(q_rows[g * q_head_stride + d]) * scale;
        acc[g * D + d] = 0.f;
      }
      m[g] = -std::numeric_limits<float>::infinity();
      l[g] = 0.f;
    }
  }

  // The scores of key kt (position t in the block) for heads g0 .. g0 + N - 1: N is
  // compile-time, so the N dot products run side by side on one load of each key vector.
  template <int64_t N>
  inline void scores(const float* __restrict kt, int64_t g0, int64_t t) {
    const float* __restrict qg = q.data() + g0 * D;
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[j * D + d] * kt[d];
      p[(g0 + j) * kMaxBlockSize + t] = s;
    }
  }

  // n keys and values of one block, token t at k[t * token_stride]: scores, then one
  // rescale of the running sums per block (not per key), then the weighted values.
  // k_next/v_next: this head in the next block (to prefetch), or null after the last.
  void update(const scalar_t* k, const scalar_t* v, int64_t n, int64_t token_stride, const scalar_t* k_next,
              const scalar_t* v_next) {
    for (int64_t t = 0; t < n; ++t) {
      if (k_next) {
        prefetch_row<scalar_t, D>(k_next + t * token_stride);
        prefetch_row<scalar_t, D>(v_next + t * token_stride);
      }
      // The key row is read for all G heads; groups of up to 4 heads share one load of it.
      alignas(64) float key[D];
      const float* kt;
      if constexpr (std::is_same_v<scalar_t, float>) {
        kt = k + t * token_stride;
      } else {
        for (int64_t d = 0; d < D; ++d) key[d] = to_f(k[t * token_stride + d]);
        kt = key;
      }
      int64_t g = 0;
      for (; g + 4 <= G; g += 4) scores<4>(kt, g, t);
      for (; g + 2 <= G; g += 2) scores<2>(kt, g, t);
      if (g < G) scores<1>(kt, g, t);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* pg = p.data() + g * kMaxBlockSize;
      const float new_m = std::max(m[g], *std::max_element(pg, pg + n));
      const float alpha = std::exp(m[g] - new_m);  // 0 on the first block: m is -inf
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        pg[t] = exp_nonpositive(pg[t] - new_m);
        sum += pg[t];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = new_m;
      // A local copy the compiler can keep in registers (acc might alias v, as far as it knows).
      alignas(64) float a[D];
      for (int64_t d = 0; d < D; ++d) a[d] = acc[g * D + d] * alpha;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) a[d] += pg[t] * to_f(v[t * token_stride + d]);
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] = a[d];
    }
  }

  void finish(scalar_t* out_rows, int64_t out_head_stride) const {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        out_rows[g * out_head_stride + d] = from_f<scalar_t>(acc[g * D + d] / l[g]);
  }
};

template <typename scalar_t, int64_t D>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                const at::Tensor& out) {
  const int64_t num_seqs = q.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t G = q.size(1) / num_kv_heads;
  const scalar_t* k_base = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_base = v_cache.data_ptr<scalar_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t token_stride = num_kv_heads * D, block_stride = block_size * token_stride;
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<HeadGroup<scalar_t, D>> heads(num_kv_heads, HeadGroup<scalar_t, D>(G));
    for (int64_t s = begin; s < end; ++s) {
      const int64_t seq_len = lens[s];
      TORCH_CHECK(seq_len > 0, "decode_attention: sequence ", s, " has seq_len ", seq_len, ", expected >= 1");
      const int32_t* table = block_tables.data_ptr<int32_t>() + s * block_tables.stride(0);
      const scalar_t* q_rows = q.data_ptr<scalar_t>() + s * q.stride(0);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        heads[h].start(q_rows + h * G * q.stride(1), q.stride(1), static_cast<float>(scale));
      const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
      // The first key in the window: blocks before its block are never read, and its block is
      // read from its offset on (the keys before it skipped, not masked).
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
      for (int64_t b = first_key / block_size; b < num_blocks; ++b) {
        const int64_t skip = b == first_key / block_size ? first_key % block_size : 0;
        const scalar_t* k = k_base + table[b] * block_stride + skip * token_stride;
        const scalar_t* v = v_base + table[b] * block_stride + skip * token_stride;
        const bool last = b + 1 == num_blocks;
        const scalar_t* k_next = last ? nullptr : k_base + table[b + 1] * block_stride;
        const scalar_t* v_next = last ? nullptr : v_base + table[b + 1] * block_stride;
        const int64_t n = std::min(block_size, seq_len - b * block_size) - skip;
        for (int64_t h = 0; h < num_kv_heads; ++h)
          heads[h].update(k + h * D, v + h * D, n, token_stride, last ? nullptr : k_next + h * D,
                          last ? nullptr : v_next + h * D);
      }
      scalar_t* out_rows = out.data_ptr<scalar_t>() + s * out.stride(0);
      for (int64_t h = 0; h < num_kv_heads; ++h) heads[h].finish(out_rows + h * G * out.stride(1), out.stride(1));
    }
  });
}

void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                      const at::Tensor& out) {
  check_paged_inputs("decode_attention", q, k_cache, v_cache, block_tables, seq_lens, out);
  TORCH_CHECK(k_cache.size(1) <= kMaxBlockSize, "block_size must be at most ", kMaxBlockSize);
  TORCH_CHECK(window >= 0, "decode_attention: window ", window, " must be >= 0 (0: no window)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    dispatch_head_dim("decode_attention", q.size(2), [&](auto d) {
      decode_all<scalar_t, decltype(d)::value>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out);
    });
  });
}

}  // namespace

TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
