// The AVX-512 variant of sambay's decode-linear kernels (see cpu_linear.cpp for the ops, the formats and the AVX2
// variant). Only this file's own functions are compiled for AVX-512 (the pragma below comes after every include,
// so no inline function from a header is emitted with AVX-512 instructions for the AVX2 paths to pick up); the ops
// call them only where the CPU has the features (isa.h).
//
// What each kernel rounds (all accumulate in fp32; sums in another order than the twins' fp32 matmul):
//   dense_*        the weight widened exactly to fp32, fp32 multiply-adds with the fp32 activation.
//   dense_bf16x    vdpbf16ps: bf16 x bf16 products are exact in fp32 and added in fp32 (round to nearest even),
//                  but inputs below 2^-126 (bf16 denormals) count as 0 and denormal partial sums are flushed to 0.
//                  Used only for bf16 activations, so the activation is not rounded.
//   int4_limbs     the activation split into two int16 limbs per group (exact to 2^-29 of the group's max |x|),
//                  integer products, one fp32 conversion per group (as the AVX2 kernel).
//   *_a8           integer dot products of 8-bit activations (quantized per 32 columns before the call) with the
//                  codes, exact in int32, converted to fp32 once per 64 or 128 columns and scaled there.
#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")

namespace sambay_isa {
namespace {

enum Kind { kBf16, kF16, kInt8 };

inline __m512 widen16(const uint16_t* p, __mmask16 m, Kind kind) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  if (kind == kF16) return _mm512_cvtph_ps(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));  // bf16: the high half of an fp32
}
inline __m512 widen16(const int8_t* p, __mmask16 m, Kind) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

inline int64_t prefetch_distance(int64_t block_bytes) { return block_bytes < 8192 ? 8192 : block_bytes; }

// sums[r] = <x, w row r> for RB rows of stride K; the K % 16 tail columns through masked loads.
template <typename T, int RB>
inline void dot_rows(const float* x, const T* w, int64_t K, Kind kind, bool prefetch, float* sums) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t k16 = K - K % 16, ahead = prefetch_distance(RB * K * static_cast<int64_t>(sizeof(T)));
  for (int64_t k = 0; k < k16; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < RB; ++r) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + ahead, _MM_HINT_T0);
      acc[r] = _mm512_fmadd_ps(widen16(w + r * K + k, 0xFFFF, kind), xv, acc[r]);
    }
  }
  if (k16 < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k16)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k16);
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(widen16(w + r * K + k16, m, kind), xv, acc[r]);
  }
  for (int r = 0; r < RB; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

constexpr int64_t kRows = 8;  // output rows per block: each activation vector loaded once serves 8 rows

template <typename T>
void dense(const float* x, const T* w, const float* scale, float* out, int64_t M, int64_t N, int64_t K, int64_t n0,
           int64_t n1, Kind kind) {
  const bool prefetch = kind == kInt8;  // as the AVX2 kernel: the 1-byte rows are short streams
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1;) {
      float sums[kRows];
      const int64_t rows = n + kRows <= n1 ? kRows : 1;
      if (rows == kRows) dot_rows<T, kRows>(x + m * K, w + n * K, K, kind, prefetch, sums);
      else dot_rows<T, 1>(x + m * K, w + n * K, K, kind, prefetch, sums);
      for (int64_t r = 0; r < rows; ++r) out[m * N + n + r] = scale ? sums[r] * scale[n + r] : sums[r];
      n += rows;
    }
  }
}

template <int RB>
inline void dot_rows_bf16x(const uint16_t* x, const uint16_t* w, int64_t K, float* sums) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t k32 = K - K % 32;
  for (int64_t k = 0; k < k32; k += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), xv);
  }
  if (k32 < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k32)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k32);
    for (int r = 0; r < RB; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + k32), xv);
  }
  for (int r = 0; r < RB; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

inline float bf16_to_f32(uint16_t b) {
  return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(static_cast<int>(static_cast<uint32_t>(b) << 16))));
}

// ---- int4, weight only: the activation in int16 limbs (see cpu_linear.cpp's split_x), 64 columns a step ---------
template <int RB>
inline void int4_limb_rows(const int16_t* hi, const int16_t* lo, const float* inv, const float* xsum, const uint8_t* q,
                           const uint16_t* sc, const uint16_t* mn, int64_t K, int64_t G, float* sums) {
  const int64_t groups = K / G, ahead = prefetch_distance(RB * K / 2);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512 limb = _mm512_set1_ps(1.f / 16384.f);
  __m512 total[RB];
  float offset[RB];
  for (int r = 0; r < RB; ++r) total[r] = _mm512_setzero_ps(), offset[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i a[RB], b[RB];
    for (int r = 0; r < RB; ++r) a[r] = b[r] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      const __m512i he = _mm512_loadu_si512(hi + k), ho = _mm512_loadu_si512(hi + k + 32);
      const __m512i le = _mm512_loadu_si512(lo + k), lo_ = _mm512_loadu_si512(lo + k + 32);
      for (int r = 0; r < RB; ++r) {
        const uint8_t* p = q + r * (K / 2) + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(p) + ahead, _MM_HINT_T0);
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        const __m512i e = _mm512_and_si512(w, low), o = _mm512_srli_epi16(w, 4);
        a[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(a[r], e, he), o, ho);
        b[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(b[r], e, le), o, lo_);
      }
    }
    for (int r = 0; r < RB; ++r) {
      const int64_t i = r * groups + g;
      const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b[r]), limb, _mm512_cvtepi32_ps(a[r]));
      total[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(bf16_to_f32(sc[i]) * inv[g]), total[r]);
      offset[r] += bf16_to_f32(mn[i]) * xsum[g];
    }
  }
  for (int r = 0; r < RB; ++r) sums[r] = _mm512_reduce_add_ps(total[r]) + offset[r];
}

// The same for groups that are multiples of 128 columns, 128 columns (64 bytes) a step without widening the bytes:
// each 16-bit lane i of the loaded weight holds the codes of columns 4i..4i+3 in its four nibbles, so four shifts
// and masks give four vectors of 32 codes (columns 4i + j for nibble j), matched by the limbs' layout (per 128
// columns: [j = 0 | 1 | 2 | 3], 32 lanes each). Half the instructions a weight of the 64-column kernel.
template <int RB>
inline void int4_limb_rows128(const int16_t* hi, const int16_t* lo, const float* inv, const float* xsum,
                              const uint8_t* q, const uint16_t* sc, const uint16_t* mn, int64_t K, int64_t G,
                              float* sums) {
  const int64_t groups = K / G, ahead = prefetch_distance(RB * K / 2);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512 limb = _mm512_set1_ps(1.f / 16384.f);
  __m512 total[RB];
  float offset[RB];
  for (int r = 0; r < RB; ++r) total[r] = _mm512_setzero_ps(), offset[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i a[RB], b[RB];
    for (int r = 0; r < RB; ++r) a[r] = b[r] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 128) {
      __m512i h[4], l[4];
      for (int j = 0; j < 4; ++j)
        h[j] = _mm512_loadu_si512(hi + k + 32 * j), l[j] = _mm512_loadu_si512(lo + k + 32 * j);
      for (int r = 0; r < RB; ++r) {
        const uint8_t* p = q + r * (K / 2) + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(p) + ahead, _MM_HINT_T0);
        const __m512i w = _mm512_loadu_si512(p);
        const __m512i n0 = _mm512_and_si512(w, low), n1 = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        const __m512i n2 = _mm512_and_si512(_mm512_srli_epi16(w, 8), low), n3 = _mm512_srli_epi16(w, 12);
        a[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(a[r], n0, h[0]), n1, h[1]);
        a[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(a[r], n2, h[2]), n3, h[3]);
        b[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(b[r], n0, l[0]), n1, l[1]);
        b[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(b[r], n2, l[2]), n3, l[3]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      const int64_t i = r * groups + g;
      const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b[r]), limb, _mm512_cvtepi32_ps(a[r]));
      total[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(bf16_to_f32(sc[i]) * inv[g]), total[r]);
      offset[r] += bf16_to_f32(mn[i]) * xsum[g];
    }
  }
  for (int r = 0; r < RB; ++r) sums[r] = _mm512_reduce_add_ps(total[r]) + offset[r];
}

// ---- 8-bit activations ------------------------------------------------------------------------------------------
constexpr int kA8Rows = 4;

// int8 codes: 64 columns a chunk; vpdpbusd multiplies unsigned by signed bytes, so |x| is the unsigned operand and
// the weight takes x's sign (codes are in [-127, 127], so negating one cannot overflow).
template <int RB>
inline void int8_a8_rows(const int8_t* xq, const float* lanes, const int8_t* w, int64_t K, float* sums) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t chunks = (K + 63) / 64, ahead = prefetch_distance(RB * K);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k = 64 * c;
    const __mmask64 m = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;
    const __m512i xv = _mm512_loadu_si512(xq + k);
    const __m512i ax = _mm512_abs_epi8(xv);
    const __mmask64 neg = _mm512_movepi8_mask(xv);
    const __m512 d = _mm512_loadu_ps(lanes + 16 * c);
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + ahead, _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(m, w + r * K + k);
      const __m512i signed_w = _mm512_mask_sub_epi8(wv, neg, zero, wv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, signed_w)), d, acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

// int4 codes: 128 columns (64 bytes) a chunk. The low nibbles are the even columns, the high ones the odd columns,
// matched by the activation's [even | odd] layout; lane l of the int32 sums covers columns [8l, 8l + 8) of the
// chunk, so its weight scale is that of group 8l / G (a broadcast when G >= 128, else a permute of 128/G scales).
template <int RB>
inline void int4_a8_rows(const int8_t* xq, const float* lanes, const float* gsum, const uint8_t* q, const uint16_t* sc,
                         const uint16_t* mn, int64_t K, int64_t G, float* sums) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t chunks = (K + 127) / 128, groups = K / G, half = K / 2, ahead = prefetch_distance(RB * half);
  const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = static_cast<int32_t>(8 * l / G);
  const __m512i idx = _mm512_load_si512(lane_group);
  const int64_t per_chunk = G >= 128 ? 1 : 128 / G;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = 64 * c, g0 = 128 * c / G;
    const __mmask64 m = half - b >= 64 ? ~0ull : (1ull << (half - b)) - 1;
    const __m512i xe = _mm512_loadu_si512(xq + 2 * b), xo = _mm512_loadu_si512(xq + 2 * b + 64);
    const __m512 d = _mm512_loadu_ps(lanes + 16 * c);
    const int64_t ng = groups - g0 < per_chunk ? groups - g0 : per_chunk;
    const __mmask8 gm = static_cast<__mmask8>((1u << ng) - 1);
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(q + r * half + b) + ahead, _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(m, q + r * half + b);
      const __m512i e = _mm512_and_si512(wv, low), o = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, e, xe), o, xo);
      __m512 s;
      if (per_chunk == 1) {
        s = _mm512_set1_ps(bf16_to_f32(sc[r * groups + g0]));
      } else {
        const __m128i raw = _mm_maskz_loadu_epi16(gm, sc + r * groups + g0);
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_zextsi128_si256(raw));
        const __m512 few = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
        s = _mm512_permutexvar_ps(idx, few);
      }
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), d), s, acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) {  // the minimums: sum_g min_g * (sum of the activation over group g)
    __m512 t = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 gm = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
      const __m512 mins = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(gm, mn + r * groups + g)), 16));
      t = _mm512_fmadd_ps(mins, _mm512_maskz_loadu_ps(gm, gsum + g), t);
    }
    sums[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(t);
  }
}

}  // namespace

void dense_bf16_avx512(const float* x, const uint16_t* w, float* out, int64_t M, int64_t N, int64_t K, int64_t n0,
                       int64_t n1) {
  dense<uint16_t>(x, w, nullptr, out, M, N, K, n0, n1, kBf16);
}

void dense_f16_avx512(const float* x, const uint16_t* w, float* out, int64_t M, int64_t N, int64_t K, int64_t n0,
                      int64_t n1) {
  dense<uint16_t>(x, w, nullptr, out, M, N, K, n0, n1, kF16);
}

void dense_int8_avx512(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N,
                       int64_t K, int64_t n0, int64_t n1) {
  dense<int8_t>(x, w, scale, out, M, N, K, n0, n1, kInt8);
}

void dense_bf16x_avx512(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t N, int64_t K,
                        int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1;) {
      float sums[kRows];
      const int64_t rows = n + kRows <= n1 ? kRows : 1;
      if (rows == kRows) dot_rows_bf16x<kRows>(x + m * K, w + n * K, K, sums);
      else dot_rows_bf16x<1>(x + m * K, w + n * K, K, sums);
      for (int64_t r = 0; r < rows; ++r) out[m * N + n + r] = sums[r];
      n += rows;
    }
  }
}

void int4_limbs_avx512(const int16_t* hi, const int16_t* lo, const float* inv, const float* xsum, const uint8_t* q,
                       const uint16_t* sc, const uint16_t* mn, float* out, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1;) {
      const int64_t rows = n + 4 <= n1 ? 4 : 1;
      const uint8_t* qr = q + n * (K / 2);
      float* o = out + m * N + n;
      const int16_t *h = hi + m * K, *l = lo + m * K;
      const float *iv = inv + m * groups, *xs = xsum + m * groups;
      const uint16_t *s = sc + n * groups, *mi = mn + n * groups;
      if (G % 128 == 0) {
        if (rows == 4) int4_limb_rows128<4>(h, l, iv, xs, qr, s, mi, K, G, o);
        else int4_limb_rows128<1>(h, l, iv, xs, qr, s, mi, K, G, o);
      } else {
        if (rows == 4) int4_limb_rows<4>(h, l, iv, xs, qr, s, mi, K, G, o);
        else int4_limb_rows<1>(h, l, iv, xs, qr, s, mi, K, G, o);
      }
      n += rows;
    }
  }
}

void int8_a8_avx512(const ActQ8& a, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N, int64_t K,
                    int64_t n0, int64_t n1) {
  const int64_t chunks = a.Kc / 64;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q + m * a.Kc;
    const float* lanes = a.lanes + m * chunks * 16;
    for (int64_t n = n0; n < n1;) {
      float sums[kA8Rows];
      const int64_t rows = n + kA8Rows <= n1 ? kA8Rows : 1;
      if (rows == kA8Rows) int8_a8_rows<kA8Rows>(xq, lanes, w + n * K, K, sums);
      else int8_a8_rows<1>(xq, lanes, w + n * K, K, sums);
      for (int64_t r = 0; r < rows; ++r) out[m * N + n + r] = sums[r] * scale[n + r];
      n += rows;
    }
  }
}

void int4_a8_avx512(const ActQ8& a, const uint8_t* q, const uint16_t* sc, const uint16_t* mn, float* out, int64_t M,
                    int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t chunks = a.Kc / 128, groups = K / G;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q + m * a.Kc;
    const float* lanes = a.lanes + m * chunks * 16;
    const float* gsum = a.gsum + m * groups;
    for (int64_t n = n0; n < n1;) {
      const int64_t rows = n + kA8Rows <= n1 ? kA8Rows : 1;
      const uint8_t* qr = q + n * (K / 2);
      float* o = out + m * N + n;
      if (rows == kA8Rows) int4_a8_rows<kA8Rows>(xq, lanes, gsum, qr, sc + n * groups, mn + n * groups, K, G, o);
      else int4_a8_rows<1>(xq, lanes, gsum, qr, sc + n * groups, mn + n * groups, K, G, o);
      n += rows;
    }
  }
}

}  // namespace sambay_isa

#pragma GCC pop_options
