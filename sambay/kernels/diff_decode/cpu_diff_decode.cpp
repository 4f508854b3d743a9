// sambay's CPU kernel for differential-attention decode: one query row per sequence against a K/V cache read once,
// in its own dtype (bf16, fp16 or fp32), with fp32 accumulation and softmax.
//
// At long context a decode step's attention is bound by reading K and V; converting them to fp32 first (what a
// matmul twin must do on CPUs without native bf16) writes and re-reads twice their size. Here each element is
// widened in registers. Both maps share V, so the kernel forms p = softmax_1 - lam * softmax_2 first and reads V
// once with half the multiply-adds: (p1 - lam p2) V = p1 V - lam p2 V.
//
//   diff_decode(q (B, G, 2, R, D) fp32 contiguous: map m, kv pair g, row r;  k (B, 2, G, S, D);  v (B, G, S, E);
//               valid (B, S) bool contiguous, or an empty tensor for "all visible";  lam (1,) fp32;  scale)
//       -> (B, G, R, E) fp32; a sequence with no visible slot gets zeros (as diff_decode_ref).
// k and v need a unit last stride; their other strides are free (views of a longer cache).
// ``isa`` ("auto", "avx2", "avx512") picks the variant of the two K/V loops (scores, p V):
// cpu_diff_decode_avx512.cpp holds the AVX-512 one; the softmax is shared.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "isa.h"
#include "simd.h"

namespace {

using namespace sambay_simd;

// sc[r * S + s] = <q row r, k row s> for s in [0, S). qv (R, d16): q's first d16 dims in load16's order for T;
// the tail dims come from q (R, D). Keys go 4 at a time so four dot products share one reduction tree.
template <typename T>
void scores(const float* qv, const float* q, const T* k, float* sc, int64_t R, int64_t D, int64_t d16, int64_t S,
            int64_t k_stride) {
  int64_t s = 0;
  for (; s + 4 <= S && d16 == D; s += 4) {
    const T* k0 = k + s * k_stride;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = qv + r * d16;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 16) {
        const __m256 x0 = _mm256_loadu_ps(qr + d), x1 = _mm256_loadu_ps(qr + d + 8);
        __m256 u, w;
        load16(k0 + d, u, w);
        a0 = _mm256_fmadd_ps(u, x0, _mm256_fmadd_ps(w, x1, a0));
        load16(k0 + k_stride + d, u, w);
        a1 = _mm256_fmadd_ps(u, x0, _mm256_fmadd_ps(w, x1, a1));
        load16(k0 + 2 * k_stride + d, u, w);
        a2 = _mm256_fmadd_ps(u, x0, _mm256_fmadd_ps(w, x1, a2));
        load16(k0 + 3 * k_stride + d, u, w);
        a3 = _mm256_fmadd_ps(u, x0, _mm256_fmadd_ps(w, x1, a3));
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      _mm_storeu_ps(sc + r * S + s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
  for (; s < S; ++s) {
    const T* kr = k + s * k_stride;
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < d16; d += 16) {
        __m256 u, w;
        load16(kr + d, u, w);
        acc = _mm256_fmadd_ps(u, _mm256_loadu_ps(qv + r * d16 + d),
                              _mm256_fmadd_ps(w, _mm256_loadu_ps(qv + r * d16 + d + 8), acc));
      }
      float x = hsum(acc);
      for (int64_t d = d16; d < D; ++d) x += q[r * D + d] * to_f32(kr[d]);
      sc[r * S + s] = x;
    }
  }
}

// Row x (S) -> exp(scale * x - max) over the visible slots (0 elsewhere), in place; returns the sum, or 0 when
// no slot is visible. visible: S bytes (0/1) or nullptr.
float softmax_numerators(float* x, int64_t S, float scale, const uint8_t* visible) {
  const int64_t s8 = S - S % 8;
  const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = ninf;
  for (int64_t s = 0; s < s8; s += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + s), vscale);
    if (visible) {
      const __m256i on = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(visible + s)));
      v = _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(on, _mm256_setzero_si256())));
    }
    _mm256_storeu_ps(x + s, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  float mx = hmax(vmax);
  for (int64_t s = s8; s < S; ++s) {
    x[s] = (visible && !visible[s]) ? -std::numeric_limits<float>::infinity() : x[s] * scale;
    mx = std::max(mx, x[s]);
  }
  if (mx == -std::numeric_limits<float>::infinity()) return 0.f;
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t s = 0; s < s8; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), vm));
    _mm256_storeu_ps(x + s, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (int64_t s = s8; s < S; ++s) {
    x[s] = x[s] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(x[s] - mx);
    sum += x[s];
  }
  return sum;
}

// out[i, e..e+16) += sum_{s in [t0, t1)} p[i, s] v[s, e..e+16) for MB rows i. pb holds the tile's p values
// already broadcast (pb[(s - t0) * MB + i]), so the inner loop is loads and multiply-adds only; accumulators are
// in load16's column order for T.
template <typename T, int MB>
inline void pv_block(const __m256* pb, const T* v, float* out, int64_t E, int64_t t0, int64_t t1, int64_t e,
                     int64_t v_stride) {
  __m256 acc[MB][2];
  for (int i = 0; i < MB; ++i) {
    acc[i][0] = _mm256_loadu_ps(out + i * E + e);
    acc[i][1] = _mm256_loadu_ps(out + i * E + e + 8);
    if (Permuted<T>::value) swap_lanes(acc[i][0], acc[i][1]);
  }
  for (int64_t s = t0; s < t1; ++s) {
    __m256 v0, v1;
    load16(v + s * v_stride + e, v0, v1);
    for (int i = 0; i < MB; ++i) {
      acc[i][0] = _mm256_fmadd_ps(pb[(s - t0) * MB + i], v0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(pb[(s - t0) * MB + i], v1, acc[i][1]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    if (Permuted<T>::value) swap_lanes(acc[i][0], acc[i][1]);
    _mm256_storeu_ps(out + i * E + e, acc[i][0]);
    _mm256_storeu_ps(out + i * E + e + 8, acc[i][1]);
  }
}

// out (MB, E) += p (MB rows of stride S) @ v (S, E), keys in L1-sized tiles.
//
// A tile is read column block by column block, so each pass touches one cache line in every row (a stride of
// E elements) and the hardware prefetchers fetch little ahead of it. The rows of the tile kPrefetchTiles ahead are
// therefore prefetched in software, spread over the tile's column passes (a burst of them all at once would fill
// the miss queues). Interleaved runs at 32K keys (bf16, G = 10, R = 2, 1 thread, Zen 3): 112 -> 74 ns a key for the
// whole kernel, 77 -> 35 ns for this product alone; 1, 2 or 4 tiles ahead were within noise, none ahead the worst.
constexpr int64_t kPrefetchTiles = 2;

template <typename T, int MB>
void pv_rows(const float* p, const T* v, float* out, int64_t S, int64_t E, int64_t v_stride) {
  constexpr int64_t kTile = 32;
  alignas(32) __m256 pb[kTile * MB];
  const int64_t e16 = E - E % 16, passes = e16 / 16, row_bytes = E * static_cast<int64_t>(sizeof(T));
  const int64_t rows_per_pass = passes ? (kTile + passes - 1) / passes : kTile;
  for (int64_t t0 = 0; t0 < S; t0 += kTile) {
    const int64_t t1 = std::min(S, t0 + kTile);
    for (int64_t s = t0; s < t1; ++s)
      for (int i = 0; i < MB; ++i) pb[(s - t0) * MB + i] = _mm256_set1_ps(p[i * S + s]);
    for (int64_t e = 0, c = 0; e < e16; e += 16, ++c) {
      const int64_t n0 = t0 + kPrefetchTiles * kTile + c * rows_per_pass, n1 = std::min(S, n0 + rows_per_pass);
      for (int64_t s = n0; s < n1; ++s) {  // prefetches never fault; rows past S are not asked for
        const char* row = reinterpret_cast<const char*>(v + s * v_stride);
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
      }
      pv_block<T, MB>(pb, v, out, E, t0, t1, e, v_stride);
    }
    for (int i = 0; i < MB; ++i) {
      for (int64_t e = e16; e < E; ++e) {
        float x = out[i * E + e];
        for (int64_t s = t0; s < t1; ++s) x += p[i * S + s] * to_f32(v[s * v_stride + e]);
        out[i * E + e] = x;
      }
    }
  }
}

template <typename T>
void pv(const float* p, const T* v, float* out, int64_t R, int64_t S, int64_t E, int64_t v_stride) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_rows<T, 4>(p + r * S, v, out + r * E, S, E, v_stride);
  for (; r + 2 <= R; r += 2) pv_rows<T, 2>(p + r * S, v, out + r * E, S, E, v_stride);
  for (; r < R; ++r) pv_rows<T, 1>(p + r * S, v, out + r * E, S, E, v_stride);
}

// The last dim of a contiguous fp32 tensor, first d16 entries only, in load16's order when ``permuted``.
at::Tensor vector_part(const at::Tensor& x, int64_t d16, bool permuted) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  at::Tensor head = x.reshape({rows, D}).narrow(1, 0, d16);
  if (!permuted) return head.contiguous();
  return head.reshape({rows, d16 / 16, 2, 2, 4}).transpose(2, 3).contiguous().view({rows, d16});
}

template <typename T> constexpr int kKind = sambay_isa::kKvF32;
template <> constexpr int kKind<uint16_t> = sambay_isa::kKvBf16;
template <> constexpr int kKind<f16> = sambay_isa::kKvF16;

template <typename T>
at::Tensor run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid, float lam,
               float scale, sambay_isa::Isa isa) {
  const bool wide = isa == sambay_isa::Isa::kAvx512;
  const int64_t B = k.size(0), G = k.size(2), S_all = k.size(3), D = k.size(4), R = q.size(3), E = v.size(3);
  const int64_t d16 = D - D % 16;
  at::Tensor qv = vector_part(q, d16, Permuted<T>::value);
  at::Tensor out = at::zeros({B, G, R, E}, q.options());
  const float* qvp = qv.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  const uint8_t* visible = valid.numel() ? reinterpret_cast<const uint8_t*>(valid.data_ptr()) : nullptr;
  float* op = out.data_ptr<float>();
  // Each sequence reads only up to its last visible slot: the static decode step passes the whole cache with the
  // unwritten tail masked, and this keeps its reads at the written prefix (1 byte of the mask per slot is scanned).
  std::vector<int64_t> used(B, S_all);
  for (int64_t b = 0; visible && b < B; ++b)
    while (used[b] > 0 && !visible[b * S_all + used[b] - 1]) --used[b];
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(2 * R * S_all);  // the two maps' scores, then their softmax numerators
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, g = t % G, S = used[b];
      for (int64_t m = 0; m < 2; ++m) {
        const int64_t row = ((b * G + g) * 2 + m) * R;
        const T* km = kp + b * k.stride(0) + m * k.stride(1) + g * k.stride(2);
        if (wide)
          sambay_isa::diff_scores_avx512(kKind<T>, qp + row * D, km, sc.data() + m * R * S, R, D, S, k.stride(3));
        else scores<T>(qvp + row * d16, qp + row * D, km, sc.data() + m * R * S, R, D, d16, S, k.stride(3));
      }
      const uint8_t* vis = visible ? visible + b * S_all : nullptr;
      bool any = true;
      std::vector<float> inv(2 * R);
      for (int64_t i = 0; i < 2 * R; ++i) {
        const float sum = softmax_numerators(sc.data() + i * S, S, scale, vis);
        any = any && sum > 0.f;
        inv[i] = sum > 0.f ? 1.f / sum : 0.f;
      }
      if (!any) continue;  // no visible slot: the output stays zero
      // p = p1 - lam * p2, written over the first map's rows
      for (int64_t r = 0; r < R; ++r) {
        float* p1 = sc.data() + r * S;
        const float* p2 = sc.data() + (R + r) * S;
        const __m256 a = _mm256_set1_ps(inv[r]), c = _mm256_set1_ps(-lam * inv[R + r]);
        int64_t s = 0;
        for (; s + 8 <= S; s += 8)
          _mm256_storeu_ps(p1 + s, _mm256_fmadd_ps(_mm256_loadu_ps(p2 + s), c,
                                                   _mm256_mul_ps(_mm256_loadu_ps(p1 + s), a)));
        for (; s < S; ++s) p1[s] = p1[s] * inv[r] - lam * inv[R + r] * p2[s];
      }
      const T* vg = vp + b * v.stride(0) + g * v.stride(1);
      if (wide) sambay_isa::diff_pv_avx512(kKind<T>, sc.data(), vg, op + t * R * E, R, S, E, v.stride(2));
      else pv<T>(sc.data(), vg, op + t * R * E, R, S, E, v.stride(2));
    }
  });
  return out;
}

at::Tensor diff_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
                       const at::Tensor& lam, double scale, c10::string_view isa_name) {
  const char* op = "sambay_cpu::diff_decode";
  TORCH_CHECK(k.device().is_cpu() && k.dim() == 5 && k.size(1) == 2 && k.stride(4) == 1, op,
              ": k must be a (B, 2, G, S, D) CPU tensor with unit last stride, got ", k.sizes(), " strides ",
              k.strides());
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(2) &&
              v.size(2) == k.size(3) && v.stride(3) == 1 && v.scalar_type() == k.scalar_type(), op,
              ": v must be a (B, G, S, E) CPU tensor of k's dtype matching k ", k.sizes(), " with unit last stride, "
              "got ", v.scalar_type(), " ", v.sizes(), " strides ", v.strides());
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 5 &&
              q.size(0) == k.size(0) && q.size(1) == k.size(2) && q.size(2) == 2 && q.size(4) == k.size(4), op,
              ": q must be contiguous fp32 (B, G, 2, R, D) matching k ", k.sizes(), ", got ", q.scalar_type(), " ",
              q.sizes());
  TORCH_CHECK(valid.numel() == 0 || (valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.dim() == 2 &&
              valid.size(0) == k.size(0) && valid.size(1) == k.size(3)), op,
              ": valid must be empty or a contiguous (B, S) bool tensor, got ", valid.scalar_type(), " ", valid.sizes());
  TORCH_CHECK(lam.numel() == 1 && lam.scalar_type() == at::kFloat && lam.device().is_cpu(), op,
              ": lam must be a one-element fp32 CPU tensor, got ", lam.scalar_type(), " ", lam.sizes());
  const float l = lam.data_ptr<float>()[0], s = static_cast<float>(scale);
  const sambay_isa::Isa isa = sambay_isa::pick(std::string(isa_name).c_str(), op);
  switch (k.scalar_type()) {
    case at::kBFloat16: return run<uint16_t>(q, k, v, valid, l, s, isa);
    case at::kHalf: return run<f16>(q, k, v, valid, l, s, isa);
    case at::kFloat: return run<float>(q, k, v, valid, l, s, isa);
    default: TORCH_CHECK(false, op, ": k and v must be bfloat16, float16 or float32, got ", k.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sambay_cpu, m) {
  m.def("diff_decode(Tensor q, Tensor k, Tensor v, Tensor valid, Tensor lam, float scale, str isa=\"auto\") -> Tensor");
}

TORCH_LIBRARY_IMPL(sambay_cpu, CPU, m) { m.impl("diff_decode", &diff_decode); }
