// Paged decode attention for CPU: one query token per sequence against its K/V read in
// place from the cache blocks, with an online softmax (no copy, no padding, no mask).
//
// Layout (the same as kernels/reference.py):
//   q, out            [num_seqs, num_heads, head_dim]       rows may be strided, head_dim contiguous
//   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   block_tables      int32 [num_seqs, max_blocks_per_seq]  token t of a sequence lives in
//                     block block_tables[s][t / block_size] at offset t % block_size
//   seq_lens          int32 [num_seqs]                      keys 0 .. seq_lens[s]-1 are read, nothing else
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
#include <vector>

#include "fast_exp.h"

namespace {

constexpr int64_t kMaxBlockSize = 128;

// Blocks are scattered, so the hardware prefetcher stops at every block boundary: while
// one block's key or value row is used, the same row of the next block is requested.
template <typename scalar_t, int64_t D>
inline void prefetch_row(const scalar_t* row) {
  for (int64_t d = 0; d < D; d += 64 / sizeof(scalar_t)) __builtin_prefetch(row + d);
}

// The running softmax of the G query heads that share one kv head. G and D are
// compile-time so that the inner loops unroll into whole vector registers.
template <typename scalar_t, int64_t G, int64_t D>
struct HeadGroup {
  alignas(64) float q[G][D];    // pre-scaled by the softmax scale
  alignas(64) float acc[G][D];  // sum of exp(score - m) * v
  float m[G], l[G];             // running max, running sum of exp(score - m)

  void start(const scalar_t* q_rows, int64_t q_head_stride, float scale) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t d = 0; d < D; ++d) {
        q[g][d] = static_cast<float>(q_rows[g * q_head_stride + d]) * scale;
        acc[g][d] = 0.f;
      }
      m[g] = -std::numeric_limits<float>::infinity();
      l[g] = 0.f;
    }
  }

  // n keys and values of one block, token t at k[t * token_stride]: scores, then one
  // rescale of the running sums per block (not per key), then the weighted values.
  // k_next/v_next: this head in the next block (to prefetch), or null after the last.
  void update(const scalar_t* k, const scalar_t* v, int64_t n, int64_t token_stride, const scalar_t* k_next,
              const scalar_t* v_next) {
    alignas(64) float p[G][kMaxBlockSize];
    for (int64_t t = 0; t < n; ++t) {
      if (k_next) {
        prefetch_row<scalar_t, D>(k_next + t * token_stride);
        prefetch_row<scalar_t, D>(v_next + t * token_stride);
      }
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += q[g][d] * static_cast<float>(k[t * token_stride + d]);
        p[g][t] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float new_m = std::max(m[g], *std::max_element(p[g], p[g] + n));
      const float alpha = std::exp(m[g] - new_m);  // 0 on the first block: m is -inf
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        p[g][t] = exp_nonpositive(p[g][t] - new_m);
        sum += p[g][t];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = new_m;
      // A local copy the compiler can keep in registers (acc might alias v, as far as it knows).
      alignas(64) float a[D];
      for (int64_t d = 0; d < D; ++d) a[d] = acc[g][d] * alpha;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) a[d] += p[g][t] * static_cast<float>(v[t * token_stride + d]);
      for (int64_t d = 0; d < D; ++d) acc[g][d] = a[d];
    }
  }

  void finish(scalar_t* out_rows, int64_t out_head_stride) const {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        out_rows[g * out_head_stride + d] = static_cast<scalar_t>(acc[g][d] / l[g]);
  }
};

template <typename scalar_t, int64_t G, int64_t D>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, const at::Tensor& out) {
  const int64_t num_seqs = q.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const scalar_t* k_base = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_base = v_cache.data_ptr<scalar_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t token_stride = num_kv_heads * D, block_stride = block_size * token_stride;
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<HeadGroup<scalar_t, G, D>> heads(num_kv_heads);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t seq_len = lens[s];
      TORCH_CHECK(seq_len > 0, "decode_attention: sequence ", s, " has seq_len ", seq_len, ", expected >= 1");
      const int32_t* table = block_tables.data_ptr<int32_t>() + s * block_tables.stride(0);
      const scalar_t* q_rows = q.data_ptr<scalar_t>() + s * q.stride(0);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        heads[h].start(q_rows + h * G * q.stride(1), q.stride(1), static_cast<float>(scale));
      const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
      for (int64_t b = 0; b < num_blocks; ++b) {
        const scalar_t* k = k_base + table[b] * block_stride;
        const scalar_t* v = v_base + table[b] * block_stride;
        const bool last = b + 1 == num_blocks;
        const scalar_t* k_next = last ? nullptr : k_base + table[b + 1] * block_stride;
        const scalar_t* v_next = last ? nullptr : v_base + table[b + 1] * block_stride;
        const int64_t n = std::min(block_size, seq_len - b * block_size);
        for (int64_t h = 0; h < num_kv_heads; ++h)
          heads[h].update(k + h * D, v + h * D, n, token_stride, last ? nullptr : k_next + h * D,
                          last ? nullptr : v_next + h * D);
      }
      scalar_t* out_rows = out.data_ptr<scalar_t>() + s * out.stride(0);
      for (int64_t h = 0; h < num_kv_heads; ++h) heads[h].finish(out_rows + h * G * out.stride(1), out.stride(1));
    }
  });
}

template <typename scalar_t, int64_t D>
void dispatch_group(int64_t group, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& tables, const at::Tensor& lens, double scale, const at::Tensor& out) {
  switch (group) {
    case 1: return decode_all<scalar_t, 1, D>(q, k, v, tables, lens, scale, out);
    case 2: return decode_all<scalar_t, 2, D>(q, k, v, tables, lens, scale, out);
    case 4: return decode_all<scalar_t, 4, D>(q, k, v, tables, lens, scale, out);
    case 8: return decode_all<scalar_t, 8, D>(q, k, v, tables, lens, scale, out);
    default: TORCH_CHECK(false, "decode_attention: num_heads / num_kv_heads must be 1, 2, 4 or 8, got ", group);
  }
}

void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && out.sizes() == q.sizes() && out.stride(2) == 1,
              "q and out must be [num_seqs, num_heads, head_dim] with head_dim contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "k_cache and v_cache must be contiguous [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.size(1) <= kMaxBlockSize, "block_size must be at most ", kMaxBlockSize);
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(),
              "q, the caches and out must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.stride(1) == 1 && seq_lens.is_contiguous(),
              "block_tables and seq_lens must be int32, rows contiguous");
  const int64_t group = q.size(1) / k_cache.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    switch (q.size(2)) {
      case 64: return dispatch_group<scalar_t, 64>(group, q, k_cache, v_cache, block_tables, seq_lens, scale, out);
      case 128: return dispatch_group<scalar_t, 128>(group, q, k_cache, v_cache, block_tables, seq_lens, scale, out);
      default: TORCH_CHECK(false, "decode_attention: head_dim must be 64 or 128, got ", q.size(2));
    }
  });
}

}  // namespace

TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
