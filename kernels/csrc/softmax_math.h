// Pieces shared by the CPU attention kernels (decode_attention.cpp, prefill_attention.cpp):
// the checks of their common inputs and the dispatch onto the compiled head shapes (the
// vectorizable exp of the online softmax is fast_exp.h's).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fast_exp.h"

// Calls f(G, D) with the GQA group and head_dim as std::integral_constant, so that a kernel's
// loops are compiled for each shape; `op` names the kernel in the error for any other shape.
template <typename F>
void dispatch_group_and_head_dim(const char* op, int64_t group, int64_t head_dim, F&& f) {
  auto with_group = [&](auto d) {
    switch (group) {
      case 1: return f(std::integral_constant<int64_t, 1>{}, d);
      case 2: return f(std::integral_constant<int64_t, 2>{}, d);
      case 4: return f(std::integral_constant<int64_t, 4>{}, d);
      case 8: return f(std::integral_constant<int64_t, 8>{}, d);
      default: TORCH_CHECK(false, op, ": num_heads / num_kv_heads must be 1, 2, 4 or 8, got ", group);
    }
  };
  switch (head_dim) {
    case 64: return with_group(std::integral_constant<int64_t, 64>{});
    case 128: return with_group(std::integral_constant<int64_t, 128>{});
    default: TORCH_CHECK(false, op, ": head_dim must be 64 or 128, got ", head_dim);
  }
}

// The layout of kernels/reference.py: q and out [tokens, num_heads, head_dim] (head_dim
// contiguous), contiguous caches [num_blocks, block_size, num_kv_heads, head_dim], int32 metadata.
inline void check_paged_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                               const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && out.sizes() == q.sizes() && out.stride(2) == 1, op,
              ": q and out must be [num_tokens, num_heads, head_dim] with head_dim contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              op, ": k_cache and v_cache must be contiguous [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(), op,
              ": q, the caches and out must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.stride(1) == 1 && seq_lens.is_contiguous(),
              op, ": block_tables and seq_lens must be int32, rows contiguous");
}
