// Pieces shared by the CPU attention kernels (decode_attention.cpp, prefill_attention.cpp):
// the checks of their common inputs and the dispatch onto the compiled head dims (the
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

// The head dims the kernels are compiled for: those of real models (Llama, Qwen, Mistral 128;
// SmolLM, Llama-3.2-1B 64; Phi-2 80; Gemma 2/3 256 ...), each a multiple of 16 so that a head
// is whole AVX-512 registers of fp32. kernels/cpu.py's HEAD_DIMS lists the same.
#define CONVEYOR_HEAD_DIMS(X) X(32) X(64) X(80) X(96) X(112) X(128) X(160) X(192) X(256)

// Calls f(D) with head_dim as a std::integral_constant, so that a kernel's inner loops are
// compiled for each head size; `op` names the kernel in the error for any other size. The
// GQA group (query heads per kv head) is a runtime value: any group is served.
template <typename F>
void dispatch_head_dim(const char* op, int64_t head_dim, F&& f) {
  switch (head_dim) {
#define CONVEYOR_CASE(d) \
  case d:                \
    return f(std::integral_constant<int64_t, d>{});
    CONVEYOR_HEAD_DIMS(CONVEYOR_CASE)
#undef CONVEYOR_CASE
    default: TORCH_CHECK(false, op, ": head_dim ", head_dim, " has no compiled kernel (see CONVEYOR_HEAD_DIMS)");
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
