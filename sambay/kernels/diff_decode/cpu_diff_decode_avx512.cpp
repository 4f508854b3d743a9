// The AVX-512 variant of the decode attention's two K/V-bound loops (cpu_diff_decode.cpp has the op, the softmax
// and the AVX2 variant): scores = q K^T over the keys, and out += p V. Compiled per function for AVX-512 (after every
// include, as cpu_linear_avx512.cpp); each K or V element is widened exactly to fp32 in registers, fp32 multiply-adds.
//
// Both loops read their rows in order, one pass each: p V keeps a whole output row pair (2 x E <= 2 x 128 fp32,
// 16 registers) in registers, so V streams row after row (the AVX2 variant holds 16 columns and walks the rows in
// column passes, which is what its software prefetch makes up for).
#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace sambay_isa {
namespace {

// Rows (keys) read ahead in software: the rows are contiguous per head, but the loops read each one in pieces
// between multiply-adds and the hardware prefetcher alone left the decode attention at ~0.8 of a plain read.
constexpr int64_t kAheadRows = 16;

// 16 stored values from p (mask m) as fp32
template <int KIND>
inline __m512 load16(const void* p, __mmask16 m) {
  if (KIND == kKvF32) return _mm512_maskz_loadu_ps(m, p);
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  if (KIND == kKvF16) return _mm512_cvtph_ps(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <int KIND> constexpr int64_t kBytes = KIND == kKvF32 ? 4 : 2;

// 4 keys' 16-lane sums -> their 4 totals
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto fold = [](__m512 x) { return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)); };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// sc[r * S + s] = <q row r, key s> for RB rows (q rows of stride D), keys 4 at a time sharing each K load.
template <int KIND, int RB>
void score_rows(const float* q, const char* k, float* sc, int64_t D, int64_t S, int64_t k_stride) {
  const int64_t row_bytes = k_stride * kBytes<KIND>;
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    __m512 acc[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (D - d)) - 1);
      __m512 kv[4];
      for (int j = 0; j < 4; ++j) kv[j] = load16<KIND>(k + (s + j) * row_bytes + d * kBytes<KIND>, m);
      for (int r = 0; r < RB; ++r) {
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + r * D + d);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(kv[j], qv, acc[r][j]);
      }
    }
    for (int r = 0; r < RB; ++r) _mm_storeu_ps(sc + r * S + s, sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
  }
  for (; s < S; ++s) {
    __m512 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (D - d)) - 1);
      const __m512 kv = load16<KIND>(k + s * row_bytes + d * kBytes<KIND>, m);
      for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(kv, _mm512_maskz_loadu_ps(m, q + r * D + d), acc[r]);
    }
    for (int r = 0; r < RB; ++r) sc[r * S + s] = _mm512_reduce_add_ps(acc[r]);
  }
}

// As score_rows for bf16 keys and queries that are exactly bf16 (a bf16 model's): vdpbf16ps, whose bf16 x bf16
// products are exact in fp32 and added in fp32 (bf16 denormals, below 2^-126, count as 0). q: (RB, D) bf16.
template <int RB>
void score_rows_bf16(const uint16_t* q, const uint16_t* k, float* sc, int64_t D, int64_t S, int64_t k_stride) {
  int64_t s = 0;
  for (; s < S; s += 4) {
    const int keys = S - s >= 4 ? 4 : static_cast<int>(S - s);
    __m512 acc[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 m = D - d >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (D - d)) - 1);
      __m512bh kv[4];
      for (int j = 0; j < 4; ++j) {
        const uint16_t* row = k + (s + (j < keys ? j : 0)) * k_stride + d;
        _mm_prefetch(reinterpret_cast<const char*>(row + kAheadRows * k_stride), _MM_HINT_T0);
        kv[j] = (__m512bh)_mm512_maskz_loadu_epi16(j < keys ? m : 0, row);
      }
      for (int r = 0; r < RB; ++r) {
        const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, q + r * D + d);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], kv[j], qv);
      }
    }
    for (int r = 0; r < RB; ++r) {
      alignas(16) float t[4];
      _mm_store_ps(t, sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      for (int j = 0; j < keys; ++j) sc[r * S + s + j] = t[j];
    }
  }
}

// out (MB, E) += p (MB rows of stride S) @ v (S, E), for the columns [e0, e0 + 128) (masked past E).
template <int KIND, int MB>
void pv_rows(const float* p, const char* v, float* out, int64_t S, int64_t E, int64_t e0, int64_t v_stride) {
  constexpr int kVec = 8;  // 8 x 16 columns
  const int64_t row_bytes = v_stride * kBytes<KIND>;
  __mmask16 m[kVec];
  for (int c = 0; c < kVec; ++c) {
    const int64_t left = E - e0 - 16 * c;
    m[c] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
  __m512 acc[MB][kVec];
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < kVec; ++c) acc[i][c] = _mm512_maskz_loadu_ps(m[c], out + i * E + e0 + 16 * c);
  for (int64_t s = 0; s < S; ++s) {
    const char* row = v + s * row_bytes + e0 * kBytes<KIND>;
    __m512 pb[MB];
    for (int i = 0; i < MB; ++i) pb[i] = _mm512_set1_ps(p[i * S + s]);
    for (int c = 0; c < kVec; ++c) {
      if (!m[c]) break;
      const __m512 vv = load16<KIND>(row + 16 * c * kBytes<KIND>, m[c]);
      for (int i = 0; i < MB; ++i) acc[i][c] = _mm512_fmadd_ps(pb[i], vv, acc[i][c]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < kVec; ++c) _mm512_mask_storeu_ps(out + i * E + e0 + 16 * c, m[c], acc[i][c]);
}

// As pv_rows for bf16 V and even E: 32 columns a load, widened without a shuffle (an fp32's high half: the even
// columns shifted up, the odd ones masked), so the loop's only shuffles are gone; the accumulators hold even and
// odd columns apart and are interleaved once at the end.
template <int MB>
void pv_rows_bf16(const float* p, const uint16_t* v, float* out, int64_t S, int64_t E, int64_t e0, int64_t v_stride) {
  constexpr int kVec = 4;  // 4 x 32 columns
  __mmask16 m[kVec];
  for (int c = 0; c < kVec; ++c) {
    const int64_t pairs = (E - e0 - 32 * c) / 2;
    m[c] = pairs >= 16 ? 0xFFFF : pairs <= 0 ? 0 : static_cast<__mmask16>((1u << pairs) - 1);
  }
  alignas(64) float even[MB][kVec][16], odd[MB][kVec][16];
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < kVec; ++c)
      for (int l = 0; l < 16; ++l) {
        const int64_t e = e0 + 32 * c + 2 * l;
        even[i][c][l] = e < E ? out[i * E + e] : 0.f;
        odd[i][c][l] = e < E ? out[i * E + e + 1] : 0.f;
      }
  __m512 ae[MB][kVec], ao[MB][kVec];
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < kVec; ++c) ae[i][c] = _mm512_load_ps(even[i][c]), ao[i][c] = _mm512_load_ps(odd[i][c]);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* row = v + s * v_stride + e0;
    __m512 pb[MB];
    for (int i = 0; i < MB; ++i) pb[i] = _mm512_set1_ps(p[i * S + s]);
    for (int c = 0; c < kVec; ++c) {
      if (!m[c]) break;
      _mm_prefetch(reinterpret_cast<const char*>(row + kAheadRows * v_stride + 32 * c), _MM_HINT_T0);
      const __m512i x = _mm512_maskz_loadu_epi32(m[c], row + 32 * c);
      const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(x, high));
      for (int i = 0; i < MB; ++i) {
        ae[i][c] = _mm512_fmadd_ps(pb[i], xe, ae[i][c]);
        ao[i][c] = _mm512_fmadd_ps(pb[i], xo, ao[i][c]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < kVec; ++c) _mm512_store_ps(even[i][c], ae[i][c]), _mm512_store_ps(odd[i][c], ao[i][c]);
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < kVec; ++c)
      for (int l = 0; l < 16; ++l) {
        const int64_t e = e0 + 32 * c + 2 * l;
        if (e < E) out[i * E + e] = even[i][c][l], out[i * E + e + 1] = odd[i][c][l];
      }
}

template <int KIND>
void scores_t(const float* q, const void* k, float* sc, int64_t R, int64_t D, int64_t S, int64_t k_stride) {
  const char* kp = static_cast<const char*>(k);
  int64_t r = 0;
  for (; r + 2 <= R; r += 2) score_rows<KIND, 2>(q + r * D, kp, sc + r * S, D, S, k_stride);
  for (; r < R; ++r) score_rows<KIND, 1>(q + r * D, kp, sc + r * S, D, S, k_stride);
}

template <int KIND>
void pv_t(const float* p, const void* v, float* out, int64_t R, int64_t S, int64_t E, int64_t v_stride) {
  const char* vp = static_cast<const char*>(v);
  for (int64_t e0 = 0; e0 < E; e0 += 128) {
    int64_t r = 0;
    if (KIND == kKvBf16 && E % 2 == 0 && v_stride % 2 == 0) {  // 4-byte aligned pairs of columns
      const uint16_t* vb = static_cast<const uint16_t*>(v);
      for (; r + 2 <= R; r += 2) pv_rows_bf16<2>(p + r * S, vb, out + r * E, S, E, e0, v_stride);
      for (; r < R; ++r) pv_rows_bf16<1>(p + r * S, vb, out + r * E, S, E, e0, v_stride);
      continue;
    }
    for (; r + 2 <= R; r += 2) pv_rows<KIND, 2>(p + r * S, vp, out + r * E, S, E, e0, v_stride);
    for (; r < R; ++r) pv_rows<KIND, 1>(p + r * S, vp, out + r * E, S, E, e0, v_stride);
  }
}

}  // namespace

void diff_scores_avx512(int kind, const float* q, const void* k, float* sc, int64_t R, int64_t D, int64_t S,
                        int64_t k_stride) {
  constexpr int64_t kMaxQ = 4096;  // R * D of one kv head's queries (the released model: 2 x 64)
  if (kind == kKvBf16 && has_avx512_bf16() && R * D <= kMaxQ) {
    uint16_t qb[kMaxQ];
    bool exact = true;  // q exactly bf16 (its low 16 bits zero): vdpbf16ps rounds nothing
    for (int64_t i = 0; i < R * D; ++i) {
      uint32_t u;
      __builtin_memcpy(&u, q + i, 4);
      exact = exact && (u & 0xFFFFu) == 0;
      qb[i] = static_cast<uint16_t>(u >> 16);
    }
    if (exact) {
      const uint16_t* kp = static_cast<const uint16_t*>(k);
      int64_t r = 0;
      for (; r + 2 <= R; r += 2) score_rows_bf16<2>(qb + r * D, kp, sc + r * S, D, S, k_stride);
      for (; r < R; ++r) score_rows_bf16<1>(qb + r * D, kp, sc + r * S, D, S, k_stride);
      return;
    }
  }
  if (kind == kKvBf16) scores_t<kKvBf16>(q, k, sc, R, D, S, k_stride);
  else if (kind == kKvF16) scores_t<kKvF16>(q, k, sc, R, D, S, k_stride);
  else scores_t<kKvF32>(q, k, sc, R, D, S, k_stride);
}

void diff_pv_avx512(int kind, const float* p, const void* v, float* out, int64_t R, int64_t S, int64_t E,
                    int64_t v_stride) {
  if (kind == kKvBf16) pv_t<kKvBf16>(p, v, out, R, S, E, v_stride);
  else if (kind == kKvF16) pv_t<kKvF16>(p, v, out, R, S, E, v_stride);
  else pv_t<kKvF32>(p, v, out, R, S, E, v_stride);
}

}  // namespace sambay_isa

#pragma GCC pop_options
