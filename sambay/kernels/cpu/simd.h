// AVX2 helpers shared by sambay's CPU kernels: loading 16 stored values as two fp32 vectors, and sums.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace sambay_simd {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct f16 {  // IEEE half, told apart from bf16 (stored as plain uint16_t) by its type
  uint16_t bits;
};

inline float to_f32(f16 h) { return _cvtsh_ss(h.bits); }
inline float to_f32(uint16_t b) {  // bf16 -> fp32: the high half of an fp32
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(float x) { return x; }
inline float to_f32(int8_t x) { return static_cast<float>(x); }

// load16(p, a, b): 16 consecutive stored values as fp32 in two vectors. bf16 is widened by interleaving with
// zeros, one instruction per vector, which leaves them in a permuted order: a = [0..3, 8..11], b = [4..7, 12..15].
// Permuted<T> says so; the operand they are multiplied with is laid out in the same order by the caller
// (vector_part), and results indexed by column are put back in order (swap_lanes in diff_decode).
template <typename T> struct Permuted { static constexpr bool value = false; };
template <> struct Permuted<uint16_t> { static constexpr bool value = true; };

inline void load16(const uint16_t* p, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}
inline void load16(const f16* p, __m256& a, __m256& b) {
  a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
inline void load16(const int8_t* p, __m256& a, __m256& b) {  // two 8-byte loads widened in the load (no shift)
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
}

// Between natural order (lo = [0..7], hi = [8..15]) and the permuted one (a = [0..3, 8..11], b = [4..7, 12..15]):
// the same two lane swaps go both ways.
inline void swap_lanes(__m256& x, __m256& y) {
  const __m256 a = _mm256_permute2f128_ps(x, y, 0x20), b = _mm256_permute2f128_ps(x, y, 0x31);
  x = a;
  y = b;
}

// e^x for 8 lanes, about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n).
// Lanes below -87.3 (e^x under fp32's normal range, and -inf) give exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

}  // namespace sambay_simd
