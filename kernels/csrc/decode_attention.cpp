// Paged decode attention for CPU: one query token per sequence against its K/V read in
// place from the cache blocks, with an online softmax (no copy, no padding, no mask).
//
// Layout (the same as kernels/reference.py):
//   q, out            [num_seqs, num_heads, head_dim]       rows may be strided, head_dim contiguous
//   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   block_tables      int32 [num_seqs, max_blocks_per_seq]  token t of a sequence lives in
//                     block block_tables[s][t / block_size] at offset t % block_size
//   seq_lens          int32 [num_seqs]                      keys 0 .. seq_lens[s]-1 are read, nothing else
// Query head h reads kv head h / group, group = num_heads / num_kv_heads. One task is one
// (sequence, kv head): it reads that head's K/V once for all `group` query heads.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kMaxBlockSize = 128;

// Blocks are scattered, so the hardware prefetcher stops at every block boundary: ask for
// the next block's K/V rows (this head's only) while the current block is computed on.
template <typename scalar_t>
inline void prefetch_block(const scalar_t* k, const scalar_t* v, int64_t offset, int64_t block_size,
                           int64_t token_stride, int64_t head_dim) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t t = 0; t < block_size; ++t)
    for (int64_t d = 0; d < head_dim; d += kLine) {
      __builtin_prefetch(k + offset + t * token_stride + d);
      __builtin_prefetch(v + offset + t * token_stride + d);
    }
}

// One (sequence, kv head): a block at a time, scores for every key of the block and every
// query head of the group, then a rescale of the running sums (online softmax). G and D are
// compile-time so that q and the accumulators stay in vector registers.
template <typename scalar_t, int64_t G, int64_t D>
void attend_one(const scalar_t* q, int64_t q_head_stride, const scalar_t* k_cache, const scalar_t* v_cache,
                const int32_t* table, int64_t seq_len, int64_t block_size, int64_t token_stride,
                int64_t block_stride, float scale, scalar_t* out, int64_t out_head_stride) {
  alignas(64) float qf[G][D], acc[G][D], scores[G][kMaxBlockSize];
  float m[G], l[G];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; ++d) {
      qf[g][d] = static_cast<float>(q[g * q_head_stride + d]) * scale;
      acc[g][d] = 0.f;
    }
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min(block_size, seq_len - b * block_size);
    const scalar_t* kb = k_cache + table[b] * block_stride;
    const scalar_t* vb = v_cache + table[b] * block_stride;
    if (b + 1 < num_blocks) prefetch_block(k_cache, v_cache, table[b + 1] * block_stride, block_size, token_stride, D);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* kt = kb + t * token_stride;
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qf[g][d] * static_cast<float>(kt[d]);
        scores[g][t] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float new_m = std::max(m[g], *std::max_element(scores[g], scores[g] + n));
      const float alpha = std::exp(m[g] - new_m);  // 0 on the first block: m is -inf
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        scores[g][t] = std::exp(scores[g][t] - new_m);
        sum += scores[g][t];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = new_m;
      for (int64_t d = 0; d < D; ++d) acc[g][d] *= alpha;
    }
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* vt = vb + t * token_stride;
      for (int64_t g = 0; g < G; ++g) {
        const float p = scores[g][t];
        for (int64_t d = 0; d < D; ++d) acc[g][d] += p * static_cast<float>(vt[d]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / l[g];
    for (int64_t d = 0; d < D; ++d) out[g * out_head_stride + d] = static_cast<scalar_t>(acc[g][d] * inv);
  }
}

template <typename scalar_t, int64_t G, int64_t D>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, const at::Tensor& out) {
  const int64_t num_seqs = q.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t token_stride = num_kv_heads * D, block_stride = block_size * token_stride;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      TORCH_CHECK(lens[s] > 0, "decode_attention: sequence ", s, " has seq_len ", lens[s], ", expected >= 1");
      attend_one<scalar_t, G, D>(qp + s * q.stride(0) + h * G * q.stride(1), q.stride(1), kp + h * D, vp + h * D,
                                 tables + s * block_tables.stride(0), lens[s], block_size, token_stride,
                                 block_stride, static_cast<float>(scale),
                                 op + s * out.stride(0) + h * G * out.stride(1), out.stride(1));
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
