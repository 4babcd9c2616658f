// Paged prefill attention for CPU: causal attention of a ragged batch of query chunks against
// their K/V read in place from the cache blocks, with an online softmax (no gather, no mask).
//
// Layout (the same as kernels/reference.py):
//   q, out            [num_tokens, num_heads, head_dim]     rows may be strided, head_dim contiguous
//   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   block_tables      int32 [num_seqs, max_blocks_per_seq]  token t of a sequence lives in
//                     block block_tables[s][t / block_size] at offset t % block_size
//   cu_seqlens_q      int32 [num_seqs + 1]  sequence s owns q rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]-1,
//                     its last q_len positions of seq_lens[s]: position p sees keys 0 .. p only
//   seq_lens          int32 [num_seqs]
//   window            position p sees keys p - window + 1 .. p only (the last `window` positions
//                     including itself, as transformers' sliding_window_overlay); 0: keys 0 .. p
// Two passes, each an at::parallel_for. First, per (sequence, kv head), its keys are gathered
// from the blocks into fp32, transposed kKeys at a time, and its values likewise (not
// transposed): once, however many query tiles read them. Then one task is one tile of kRows
// query rows of one kv head of one sequence: the rows of a (sequence, kv head) are its tokens'
// G query heads in order (row t * G + g), so a tile holds any group G, whole or split, and
// rows of several tokens (16 / G of them, plus a part, for G = 3). The task walks
// the keys up to its last row's position kKeys at a time, scoring with kRows x kKeys fmas per
// head_dim element (one vector register per row), so each key and value is loaded once for
// all kRows rows. Keys past a row's position (the diagonal steps only) are masked out. With a
// window, only the keys from the window of the chunk's first token on are staged, a tile walks
// from its first row's window on, and keys before a row's window are masked out likewise.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "softmax_math.h"

namespace {

constexpr int64_t kRows = 16;  // query rows per task; their scores stay in registers
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kKeys = 16;  // keys per step: one AVX-512 register of fp32 scores per row
// kKeys floats as one vector (GCC/clang vector extension): arithmetic on it is elementwise and
// a scalar operand is broadcast, so the tile loops below are written in whole registers.
typedef float Keys __attribute__((vector_size(kKeys * sizeof(float))));

constexpr int64_t floor_pow2(int64_t n) { return n < 2 ? 1 : 2 * floor_pow2(n / 2); }

template <typename scalar_t, int64_t D>
struct QueryTile {
  alignas(64) float q[kRows][D];    // pre-scaled by the softmax scale
  Keys acc[kRows][D / kKeys];       // sum of exp(score - m) * v
  float m[kRows], l[kRows];         // running max, running sum of exp(score - m)
  int64_t pos[kRows];               // the row's position in its sequence: keys past it are masked
  int64_t lo[kRows];                // with a window, its first key: keys before it are masked
  int64_t num_rows;                 // real rows in this tile (the last tile of a chunk may be short)

  // Rows first_row .. first_row + kRows - 1 of a chunk of n_tokens tokens whose first sits at
  // position first_pos; row i is token i / G, query head i % G of the kv head at q_head0. Rows
  // past the chunk's end get q = 0 and the last token's position, and are never written back.
  void start(const scalar_t* q_head0, int64_t token_stride, int64_t head_stride, int64_t G, int64_t first_row,
             int64_t n_tokens, int64_t first_pos, float scale, int64_t window) {
    num_rows = std::min(kRows, n_tokens * G - first_row);
    for (int64_t r = 0; r < kRows; ++r) {
      const bool real = r < num_rows;
      const int64_t i = real ? first_row + r : n_tokens * G - 1;
      const scalar_t* row = q_head0 + (i / G) * token_stride + (i % G) * head_stride;
      for (int64_t d = 0; d < D; ++d) q[r][d] = real ? static_cast<float>(row[d]) * scale : 0.f;
      for (int64_t c = 0; c < D / kKeys; ++c) acc[r][c] = Keys{};
      m[r] = -kInf;
      l[r] = 0.f;
      pos[r] = first_pos + i / G;
      lo[r] = window > 0 ? std::max<int64_t>(0, pos[r] - window + 1) : 0;
    }
  }

  // kt: keys first_key .. first_key+kKeys-1 transposed (kt[d] = the keys' element d), v: their
  // values, key j's from v[j * D / kKeys]. A row's position is never past its sequence's end, so
  // the keys it sees are real ones. Without a window the first step holds key 0, which every row
  // sees, so m is finite after it and a later step whose keys a row all masks adds exactly 0.
  // kWindowed: keys before a row's lo are masked too, so a row may see none of a step's keys
  // while m is still -inf: it then keeps alpha = 1 (acc = l = 0 stay 0). A template argument,
  // so that the loop without a window is the same code as before windows.
  template <bool kWindowed>
  void update(const Keys* kt, const Keys* v, int64_t first_key) {
    Keys s[kRows] = {};  // kRows vector registers, one row's scores each
    for (int64_t d = 0; d < D; ++d) {
#pragma GCC unroll 16
      for (int64_t r = 0; r < kRows; ++r) s[r] += q[r][d] * kt[d];
    }
    alignas(64) float p[kRows][kKeys], alpha[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t visible = pos[r] - first_key + 1;  // keys j < visible are <= pos[r]
      const int64_t hidden = kWindowed ? lo[r] - first_key : 0;  // keys j < hidden are before the window
      std::memcpy(p[r], &s[r], sizeof p[r]);
      float new_m = m[r];
      if constexpr (kWindowed) {
#pragma omp simd reduction(max : new_m)
        for (int64_t j = 0; j < kKeys; ++j) new_m = std::max(new_m, j >= hidden && j < visible ? p[r][j] : -kInf);
        alpha[r] = new_m == -kInf ? 1.f : exp_nonpositive(m[r] - new_m);
      } else {
#pragma omp simd reduction(max : new_m)
        for (int64_t j = 0; j < kKeys; ++j) new_m = std::max(new_m, j < visible ? p[r][j] : -kInf);
        alpha[r] = exp_nonpositive(m[r] - new_m);  // ~1e-38 on the first step (m is -inf), times acc = l = 0
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < kKeys; ++j) {
        p[r][j] = j >= hidden && j < visible ? exp_nonpositive(p[r][j] - new_m) : 0.f;
        sum += p[r][j];
      }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = new_m;
    }
    // kPass rows at a time, their accumulators in at most 16 registers: enough independent fma
    // chains to hide the fma latency, and each value vector loaded once for them all. A power
    // of two, so that passes tile the kRows rows exactly (D = 80 or 96 gives 2).
    constexpr int64_t C = D / kKeys, kPass = floor_pow2(16 / C);
    for (int64_t r0 = 0; r0 < kRows; r0 += kPass) {
      Keys a[kPass][C];
      for (int64_t r = 0; r < kPass; ++r)
        for (int64_t c = 0; c < C; ++c) a[r][c] = acc[r0 + r][c] * alpha[r0 + r];
      for (int64_t j = 0; j < kKeys; ++j)
        for (int64_t c = 0; c < C; ++c)
#pragma GCC unroll 4
          for (int64_t r = 0; r < kPass; ++r) a[r][c] += p[r0 + r][j] * v[j * C + c];
      for (int64_t r = 0; r < kPass; ++r)
        for (int64_t c = 0; c < C; ++c) acc[r0 + r][c] = a[r][c];
    }
  }

  void finish(scalar_t* out_head0, int64_t token_stride, int64_t head_stride, int64_t G, int64_t first_row) const {
    for (int64_t r = 0; r < num_rows; ++r) {
      const int64_t i = first_row + r;
      scalar_t* row = out_head0 + (i / G) * token_stride + (i % G) * head_stride;
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<scalar_t>(acc[r][d / kKeys][d % kKeys] / l[r]);
    }
  }
};

// Keys first_key .. num_keys - 1 and their values of one kv head of one sequence (first_key a
// multiple of kKeys), gathered from its blocks into fp32, zero up to a multiple of kKeys: keys
// transposed in steps of kKeys (kt[step * D + d] holds element d of the step's keys, step 0 the
// one of first_key), values as rows of D / kKeys vectors. Done once per (sequence, kv head)
// rather than by each of its query tiles.
template <typename scalar_t, int64_t D>
void stage_keys(const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* table, int64_t first_key,
                int64_t num_keys, int64_t block_size, int64_t token_stride, Keys* kt, Keys* v) {
  constexpr int64_t C = D / kKeys;
  const int64_t padded = (num_keys + kKeys - 1) / kKeys * kKeys;
  for (int64_t key = first_key; key < padded; ++key) {
    const int64_t at = key < num_keys ? (table[key / block_size] * block_size + key % block_size) * token_stride : 0;
    const int64_t i = key - first_key;
    Keys* kt_step = kt + i / kKeys * D;
    for (int64_t d = 0; d < D; ++d) {
      kt_step[d][i % kKeys] = key < num_keys ? static_cast<float>(k_cache[at + d]) : 0.f;
      v[i * C + d / kKeys][d % kKeys] = key < num_keys ? static_cast<float>(v_cache[at + d]) : 0.f;
    }
  }
}

template <typename scalar_t, int64_t D>
void prefill_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                 double scale, int64_t window, const at::Tensor& out) {
  const int64_t num_seqs = seq_lens.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t token_stride = num_kv_heads * D, G = q.size(1) / num_kv_heads;
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  // The first key any query of sequence s sees (its first token's window), down to a step.
  auto first_key = [&](int64_t s) {
    return window > 0 ? std::max<int64_t>(0, lens[s] - (cu[s + 1] - cu[s]) - window + 1) / kKeys * kKeys : 0;
  };
  auto steps = [&](int64_t s) {
    return cu[s + 1] > cu[s] ? (lens[s] + kKeys - 1) / kKeys - first_key(s) / kKeys : 0;
  };
  // Every (sequence, first row of a tile); a task is one of these for one kv head.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = cu[s + 1] - cu[s];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[s], "prefill_attention: sequence ", s, " has ", q_len,
                " query tokens but seq_len ", lens[s]);
    for (int64_t r = 0; r < q_len * G; r += kRows) tiles.emplace_back(s, r);
  }
  TORCH_CHECK(cu[0] >= 0 && cu[num_seqs] <= q.size(0), "prefill_attention: cu_seqlens_q runs ", cu[0], " .. ",
              cu[num_seqs], " but q has ", q.size(0), " rows");
  // Staged keys of (sequence s, kv head h) start at step first_step[s] + h * steps(s).
  std::vector<int64_t> first_step(num_seqs + 1, 0);
  for (int64_t s = 0; s < num_seqs; ++s) first_step[s + 1] = first_step[s] + steps(s) * num_kv_heads;
  std::unique_ptr<Keys[]> kt(new Keys[first_step[num_seqs] * D]), vt(new Keys[first_step[num_seqs] * D]);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads, step = first_step[s] + h * steps(s);
      if (steps(s) == 0) continue;  // no queries: nothing reads this sequence's keys
      const int32_t* table = block_tables.data_ptr<int32_t>() + s * block_tables.stride(0);
      stage_keys<scalar_t, D>(k_cache.data_ptr<scalar_t>() + h * D, v_cache.data_ptr<scalar_t>() + h * D, table,
                              first_key(s), lens[s], block_size, token_stride, kt.get() + step * D,
                              vt.get() + step * D);
    }
  });
  at::parallel_for(0, static_cast<int64_t>(tiles.size()) * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    QueryTile<scalar_t, D> tile;
    for (int64_t task = begin; task < end; ++task) {
      const auto [s, r0] = tiles[task / num_kv_heads];
      const int64_t h = task % num_kv_heads, q_len = cu[s + 1] - cu[s], prefix = lens[s] - q_len;
      const int64_t head = h * G;
      tile.start(q.data_ptr<scalar_t>() + cu[s] * q.stride(0) + head * q.stride(1), q.stride(0), q.stride(1), G, r0,
                 q_len, prefix, static_cast<float>(scale), window);
      const int64_t last_token = (r0 + tile.num_rows - 1) / G;
      const int64_t num_keys = prefix + last_token + 1;  // what the tile's last token sees
      const int64_t step = first_step[s] + h * steps(s), staged = first_key(s);
      if (window > 0) {
        // From the step of the tile's first row's window: steps before it are all masked for every row.
        for (int64_t key = tile.lo[0] / kKeys * kKeys; key < num_keys; key += kKeys)
          tile.template update<true>(kt.get() + (step + (key - staged) / kKeys) * D,
                                     vt.get() + step * D + (key - staged) * (D / kKeys), key);
      } else {
        for (int64_t key = 0; key < num_keys; key += kKeys)
          tile.template update<false>(kt.get() + (step + key / kKeys) * D, vt.get() + step * D + key * (D / kKeys),
                                      key);
      }
      tile.finish(out.data_ptr<scalar_t>() + cu[s] * out.stride(0) + head * out.stride(1), out.stride(0),
                  out.stride(1), G, r0);
    }
  });
}

void prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                       double scale, int64_t window, const at::Tensor& out) {
  check_paged_inputs("prefill_attention", q, k_cache, v_cache, block_tables, seq_lens, out);
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.is_contiguous() &&
                  cu_seqlens_q.numel() == seq_lens.numel() + 1 && block_tables.size(0) == seq_lens.numel(),
              "prefill_attention: cu_seqlens_q must be int32 [num_seqs + 1], block_tables [num_seqs, ...]");
  TORCH_CHECK(window >= 0, "prefill_attention: window ", window, " must be >= 0 (0: no window)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention", [&] {
    dispatch_head_dim("prefill_attention", q.size(2), [&](auto d) {
      prefill_all<scalar_t, decltype(d)::value>(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                                window, out);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
        "Tensor seq_lens, float scale, int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
