// exp(x) for x <= 0, branch-free so that a loop of it vectorizes (std::exp is a scalar libm
// call): 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p of degree 6 (relative error ~2e-7).
// Below -87 it returns ~1e-38 instead of 0, harmless beside a softmax's max (exp(0)) or 1 + e.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln2 in two parts, exact n*hi
  float p = 1.f / 720 * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;  // times 2^n
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}
