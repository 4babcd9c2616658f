// Conversions between a tensor's dtype and fp32 for the CPU kernels. bf16 goes by its bits,
// as c10::BFloat16 converts (round to nearest even; NaN stays a quiet NaN), in a form the
// compiler vectorizes: through c10's conversions the elementwise loops stayed scalar and ran
// 4-13x slower in bf16 than in fp32.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace {

template <typename scalar_t>
inline float to_f(scalar_t v) { return static_cast<float>(v); }
template <>
inline float to_f<c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename scalar_t>
inline scalar_t from_f(float v) { return static_cast<scalar_t>(v); }
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}
}  // namespace
