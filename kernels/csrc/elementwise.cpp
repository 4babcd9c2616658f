// The decoder layer's elementwise ops for CPU, each one pass over its rows instead of the
// 3-6 eager torch ops (and temporaries) it replaces: rms_norm, residual add + rms_norm,
// silu(gate) * up, and neox-style rotary embedding in place.
//
// Numerics follow the eager path (services/gpu_worker/layer_ops.py) step by step: math in
// fp32, and every intermediate the eager path stores in the tensor's dtype is rounded to
// it here too (round_to), so bf16/fp16 results round the same way. Rows are [..., H] with
// H contiguous; a row's other strides may be anything (q and k are views of the qkv output).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dtype_cast.h"
#include "fast_exp.h"

namespace {

// Rows per thread task: a few thousand elements, so a decode batch is not split into tasks
// that cost more to hand out than to run.
inline int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

template <typename scalar_t>
inline float round_to(float v) { return to_f(from_f<scalar_t>(v)); }

// out = weight * round(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm.
template <typename scalar_t>
inline void rms_row(const scalar_t* x, const scalar_t* w, int64_t n, float eps, scalar_t* out) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) sq += to_f(x[i]) * to_f(x[i]);
  const float r = 1.f / std::sqrt(sq / n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = from_f<scalar_t>(to_f(w[i]) * round_to<scalar_t>(to_f(x[i]) * r));
}

// x [A, B, H] (row (a, b) at a * stride(0) + b * stride(1)), out contiguous [A, B, H].
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && out.is_contiguous() && out.sizes() == x.sizes() &&
                  weight.is_contiguous() && weight.numel() == x.size(2),
              "rms_norm: x [A, B, H] with H contiguous, out contiguous like x, weight [H]");
  const int64_t rows_b = x.size(1), n = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * rows_b, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        rms_row(xp + (r / rows_b) * x.stride(0) + (r % rows_b) * x.stride(1), w, n, static_cast<float>(eps),
                o + r * n);
    });
  });
}

// (The loops live in functions: a pragma cannot sit inside the dispatch macro's argument.)
template <typename scalar_t>
inline void add_row(scalar_t* row, const scalar_t* delta, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row[i] = from_f<scalar_t>(to_f(row[i]) + to_f(delta[i]));
}

// h += delta (rounded, as the eager `h + delta`), then out = rms_norm(h): one read of each.
void add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight, double eps,
                  const at::Tensor& out) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && delta.is_contiguous() && out.is_contiguous() &&
                  delta.sizes() == h.sizes() && out.sizes() == h.sizes() && weight.is_contiguous() &&
                  weight.numel() == h.size(1),
              "add_rms_norm: h, delta and out contiguous [T, H], weight [H]");
  const int64_t n = h.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "add_rms_norm", [&] {
    scalar_t *hp = h.data_ptr<scalar_t>(), *o = out.data_ptr<scalar_t>();
    const scalar_t *d = delta.data_ptr<scalar_t>(), *w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, h.size(0), grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_row(hp + r * n, d + r * n, n);
        rms_row(hp + r * n, w, n, static_cast<float>(eps), o + r * n);
      }
    });
  });
}

template <typename scalar_t>
inline void silu_mul_row(const scalar_t* gate, int64_t n, scalar_t* out) {
  const scalar_t* up = gate + n;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_f(gate[i]);
    const float e = exp_nonpositive(-std::abs(x));
    const float act = round_to<scalar_t>(x * ((x >= 0.f ? 1.f : e) / (1.f + e)));
    out[i] = from_f<scalar_t>(act * to_f(up[i]));
  }
}

// gate_up [T, 2I] (gate first) -> out [T, I] = silu(gate) * up, silu(x) = x * sigmoid(x)
// with sigmoid from e = exp(-|x|) <= 1: 1 / (1 + e) for x >= 0, e / (1 + e) below.
void silu_and_mul(const at::Tensor& gate_up, const at::Tensor& out) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && out.is_contiguous() &&
                  gate_up.size(1) == 2 * out.size(1) && out.size(0) == gate_up.size(0),
              "silu_and_mul: gate_up [T, 2I] with rows contiguous, out contiguous [T, I]");
  const int64_t n = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* g = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.size(0), grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(g + r * gate_up.stride(0), n, o + r * n);
    });
  });
}

// One [heads, D] row group rotated in place: x1, x2 the halves, out = (x1 c - x2 s, x2 c + x1 s).
template <typename scalar_t>
inline void rotate_heads(scalar_t* x, int64_t heads, int64_t head_stride, const scalar_t* c, const scalar_t* s,
                         int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    scalar_t* x1 = x + h * head_stride;
    scalar_t* x2 = x1 + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = to_f(x1[i]), b = to_f(x2[i]);
      x1[i] = from_f<scalar_t>(round_to<scalar_t>(a * to_f(c[i])) - round_to<scalar_t>(b * to_f(s[i])));
      x2[i] = from_f<scalar_t>(round_to<scalar_t>(b * to_f(c[i + half])) + round_to<scalar_t>(a * to_f(s[i + half])));
    }
  }
}

// q [T, H, D], k [T, Hkv, D] (head_dim contiguous), cos/sin [T, D] rows contiguous.
void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "rotary: q [T, H, D] and k [T, Hkv, D] with head_dim even and contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) && cos.size(1) == q.size(2) &&
                  cos.stride(1) == 1 && sin.stride(1) == 1,
              "rotary: cos and sin [T, D] with rows contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(),
              "rotary: q, k, cos and sin must share a dtype");
  const int64_t half = q.size(2) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary", [&] {
    scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
    const scalar_t *cp = cos.data_ptr<scalar_t>(), *sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, q.size(0), grain((q.size(1) + k.size(1)) * q.size(2)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t *c = cp + t * cos.stride(0), *s = sp + t * sin.stride(0);
        rotate_heads(qp + t * q.stride(0), q.size(1), q.stride(1), c, s, half);
        rotate_heads(kp + t * k.stride(0), k.size(1), k.stride(1), c, s, half);
      }
    });
  });
}

}  // namespace

// A fragment: the decode attention extension defines the conveyor_cpu library itself.
TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor(a!) h, Tensor delta, Tensor weight, float eps, Tensor(b!) out) -> ()");
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("rotary(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
