// Writes each token's key and value into its cache slot, in place: what kernels/reference.py
// store_kv does with a boolean mask and index_put, without building index tensors (~30 us a
// call there, whatever the batch; here a copy of each token's row).
//
// Layout:
//   key, value        [num_tokens, num_kv_heads, head_dim]  token rows may be strided, each row contiguous
//   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   slot_mapping      int64 [num_tokens]  slot = block * block_size + offset; negative: padding, skipped

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

namespace {

void store_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  const int64_t row = k_cache.size(2) * k_cache.size(3), num_slots = k_cache.size(0) * k_cache.size(1);
  for (const at::Tensor* x : {&key, &value})
    TORCH_CHECK(x->dim() == 3 && x->size(1) * x->size(2) == row && x->stride(2) == 1 && x->stride(1) == x->size(2) &&
                    x->scalar_type() == k_cache.scalar_type(),
                "store_kv: key and value must be [num_tokens, num_kv_heads, head_dim] of the caches' dtype, "
                "each token's row contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "store_kv: k_cache and v_cache must be contiguous [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0) && value.size(0) == key.size(0),
              "store_kv: slot_mapping must be int64 [num_tokens]");
  const int64_t bytes = row * k_cache.element_size();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto* k_out = static_cast<char*>(k_cache.data_ptr());
  auto* v_out = static_cast<char*>(v_cache.data_ptr());
  const auto* k_in = static_cast<const char*>(key.data_ptr());
  const auto* v_in = static_cast<const char*>(value.data_ptr());
  for (int64_t t = 0; t < key.size(0); ++t) {
    if (slots[t] < 0) continue;
    TORCH_CHECK(slots[t] < num_slots, "store_kv: token ", t, " has slot ", slots[t], " of ", num_slots);
    std::memcpy(k_out + slots[t] * bytes, k_in + t * key.stride(0) * k_cache.element_size(), bytes);
    std::memcpy(v_out + slots[t] * bytes, v_in + t * value.stride(0) * k_cache.element_size(), bytes);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("store_kv", &store_kv); }
