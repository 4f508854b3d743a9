// sambay's CPU kernels for decode-sized linears (a few rows of activations against a large weight):
// y = x W^T with W in bf16, fp16, int8 (per output channel scale) or int4 (per group scale and minimum), and the
// int8/int4 products with 8-bit activations (the activation quantized per block of 32 columns inside the op).
//
// At batch 1 a linear reads every weight byte once per token and does 2 flops per weight, so its speed is the
// speed at which the weight streams from memory. These kernels convert each weight in registers and accumulate in
// fp32, never writing a converted copy; rows are split over ATen's thread pool. Each op has an AVX2 variant (this
// file, compiled for AVX2 + FMA + F16C) and an AVX-512 one (cpu_linear_avx512.cpp); ``isa`` picks it ("auto": from
// the CPU's features, isa.h). Their plain-PyTorch twins (dequantize, then matmul) are in ref.py and __init__.py.
//
// Shapes: x (M, K) fp32 contiguous (linear_dense also takes bf16 x against a bf16 weight); W (N, K) contiguous
// (int4: (N, K/2) bytes, element 2j in the low nibble of byte j, 2j+1 in the high one); scales (N,) fp32 (int8) or
// (N, K/G) bf16 (int4), mins (N, K/G) bf16. int8: w = q * scale, q in [-127, 127].  int4: w = q * scale + min,
// q in [0, 15].  Returns (M, N) fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "isa.h"
#include "simd.h"

namespace {

using namespace sambay_simd;
using sambay_isa::ActQ8;
using sambay_isa::Isa;
using sambay_isa::kActBlock;
using namespace sambay_isa;

// Output rows per inner block: each x vector loaded once serves 8 rows. Measured on a 2-core Zen 3 (bf16, 2560
// columns): 1.14x the time of an fp32 sum over the same bytes with 8 rows, 1.16-1.26x with 4, 1.23x with 1.
constexpr int64_t kRows = 8;

// Software prefetch of the weight, for the 1-byte and half-byte formats. A block of rows is read as several short
// streams (one per row, K bytes or less each), which the hardware prefetchers follow poorly: interleaved A/B
// runs on the 2-core Zen 3 (a 105 MB matrix, 2 threads, against a plain AVX2 read of the same bytes) had int8 at
// 0.55 of the read's speed without prefetch and 0.84 with each row's bytes prefetched one block of rows ahead
// (the same position in the next block: the rows of a block are contiguous, so the read runs ahead by exactly one
// block); int4 went from 0.27 to 0.42, where its arithmetic is the limit. bf16 rows are twice as long per weight
// and were at 0.95 without prefetch, 0.80-0.84 with it, so it has none. Prefetches never fault, so running
// past the end of the matrix is harmless.
template <typename T> struct Prefetched { static constexpr bool value = false; };
template <> struct Prefetched<int8_t> { static constexpr bool value = true; };

inline int64_t prefetch_distance(int64_t block_bytes) { return block_bytes < 8192 ? 8192 : block_bytes; }

// sums[r] = <xv, w row r> over the first k16 columns, for RB consecutive rows (row stride K). One accumulator per
// row: RB independent chains hide the multiply-add latency. Accumulators are locals of this function alone, so
// they stay in registers (sharing them with a tail loop made GCC spill them).
template <typename W, int RB>
inline void dot_rows(const float* xv, const W* w, int64_t K, int64_t k16, float* sums) {
  __m256 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t ahead = prefetch_distance(RB * K * static_cast<int64_t>(sizeof(W)));
  for (int64_t k = 0; k < k16; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(xv + k), x1 = _mm256_loadu_ps(xv + k + 8);
    for (int r = 0; r < RB; ++r) {
      __m256 a, b;
      if (Prefetched<W>::value) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + ahead, _MM_HINT_T0);
      load16(w + r * K + k, a, b);
      acc[r] = _mm256_fmadd_ps(b, x1, _mm256_fmadd_ps(a, x0, acc[r]));
    }
  }
  for (int r = 0; r < RB; ++r) sums[r] = hsum(acc[r]);
}

// out[m, n] = sum_k x[m, k] * w[n, k] * (scale ? scale[n] : 1) for n in [n0, n1). xv (M, k16) is x's first k16
// columns in load16's order for W; the K - k16 tail columns are read from x (M, K) one at a time.
template <typename W>
void dense_rows(const float* xv, const float* x, const W* w, const float* scale, float* out, int64_t M, int64_t N,
                int64_t K, int64_t k16, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float* om = out + m * N;
    for (int64_t n = n0; n < n1;) {
      float sums[kRows];
      const int64_t rows = n + kRows <= n1 ? kRows : 1;
      if (rows == kRows) {
        dot_rows<W, kRows>(xv + m * k16, w + n * K, K, k16, sums);
      } else {
        dot_rows<W, 1>(xv + m * k16, w + n * K, K, k16, sums);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float s = sums[r];
        for (int64_t k = k16; k < K; ++k) s += xm[k] * to_f32(w[(n + r) * K + k]);
        om[n + r] = scale ? s * scale[n + r] : s;
      }
      n += rows;
    }
  }
}

// x's first k16 columns as the vector loop reads them: in load16's permuted order when W's loads are permuted.
at::Tensor vector_part(const at::Tensor& x, int64_t k16, bool permuted) {
  const int64_t M = x.size(0);
  at::Tensor head = x.narrow(1, 0, k16);
  if (!permuted) return head.contiguous();
  return head.reshape({M, k16 / 16, 2, 2, 4}).transpose(2, 3).contiguous().view({M, k16});
}

// Rows per parallel task: about 256 KB of weight, so a task amortises its scheduling and a matrix of a
// few MB still spreads over every thread.
int64_t grain(int64_t K, double bytes_per_weight) {
  const int64_t rows = static_cast<int64_t>((256 * 1024) / (K * bytes_per_weight + 1));
  return rows < kRows ? kRows : rows - rows % kRows;
}

void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous 2-D fp32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " columns, the weight ", K);
}

template <typename W>
at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const float* scale, double bytes) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const int64_t k16 = K - K % 16;
  at::Tensor xv = vector_part(x, k16, Permuted<W>::value);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xvp = xv.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const W* wp = reinterpret_cast<const W*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, grain(K, bytes), [&](int64_t n0, int64_t n1) {
    dense_rows<W>(xvp, xp, wp, scale, op, M, N, K, k16, n0, n1);
  });
  return out;
}

// Runs fn(n0, n1) over the N output rows on ATen's threads, into a new (M, N) fp32 tensor.
template <typename F>
at::Tensor rows_out(int64_t M, int64_t N, int64_t K, double bytes, const F& fn) {
  at::Tensor out = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, grain(K, bytes), [&](int64_t n0, int64_t n1) { fn(op, n0, n1); });
  return out;
}

at::Tensor linear_dense(const at::Tensor& x, const at::Tensor& w, c10::string_view isa_name) {
  const char* op = "sambay_cpu::linear_dense";
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
              (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf), op, ": the weight must be a "
              "contiguous 2-D bfloat16 or float16 CPU tensor (fp32 linears are ATen's), got ", w.scalar_type(), " ",
              w.sizes());
  const Isa isa = pick(std::string(isa_name).c_str(), op);
  const int64_t N = w.size(0), K = w.size(1);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.size(1) == K, op, ": x must be a "
                "contiguous (M, ", K, ") CPU tensor, got ", x.sizes());
    if (isa == Isa::kAvx512 && has_avx512_bf16()) {  // bf16 x bf16 products: exact in fp32 (vdpbf16ps)
      const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
      const int64_t M = x.size(0);
      return rows_out(M, N, K, 2.0, [&](float* o, int64_t n0, int64_t n1) {
        dense_bf16x_avx512(xp, wp, o, M, N, K, n0, n1);
      });
    }
    return linear_dense(x.to(at::kFloat), w, isa_name);  // the widening kernels: the same products and sums
  }
  check_x(x, K, op);
  if (isa == Isa::kAvx2) {
    if (w.scalar_type() == at::kBFloat16) return dense<uint16_t>(x, w, nullptr, 2.0);
    return dense<f16>(x, w, nullptr, 2.0);
  }
  const float* xp = x.data_ptr<float>();
  const int64_t M = x.size(0);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  return rows_out(M, N, K, 2.0, [&](float* o, int64_t n0, int64_t n1) {
    if (bf16) dense_bf16_avx512(xp, wp, o, M, N, K, n0, n1);
    else dense_f16_avx512(xp, wp, o, M, N, K, n0, n1);
  });
}

void check_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
              qweight.is_contiguous(), op, ": qweight must be a contiguous (N, K) int8 CPU tensor, got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == qweight.size(0) &&
              scales.is_contiguous(), op, ": scales must be contiguous (N,) fp32, got ", scales.scalar_type(), " ",
              scales.sizes());
  check_x(x, qweight.size(1), op);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       c10::string_view isa_name) {
  const char* op = "sambay_cpu::linear_int8";
  check_int8(x, qweight, scales, op);
  if (pick(std::string(isa_name).c_str(), op) == Isa::kAvx2)
    return dense<int8_t>(x, qweight, scales.data_ptr<float>(), 1.0);
  const int64_t M = x.size(0), N = qweight.size(0), K = qweight.size(1);
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  return rows_out(M, N, K, 1.0, [&](float* o, int64_t n0, int64_t n1) {
    dense_int8_avx512(xp, wp, sp, o, M, N, K, n0, n1);
  });
}

// int4: for each group of G weights of a row, sum_k x_k (q_k s + mn) = s * sum_k x_k q_k + mn * sum_k x_k.
//
// Widening every nibble to fp32 costs a conversion and a multiply-add per weight, which made this kernel compute-bound
// at ~3.5x its read time. Instead x is split once per call, per group, into two int16 limbs: with
// c_g = 2^14 / max|x_g|, x c_g = hi + lo 2^-14 + e, |hi| <= 2^14, |lo| <= 2^13, |e| <= 2^-15 (x's value is kept to
// 2^-29 of the group's largest |x|, far below fp32 rounding of the sum). Then sum_k q_k x_k = (A + B 2^-14) / c_g
// with A = sum q hi and B = sum q lo exact int32 sums (vpmaddwd / vpdpwssd, no conversion); they are converted to
// fp32 once per group. The limbs are stored per `span` columns (32 for AVX2, 64 for AVX-512) as [even | odd]
// halves, matching the low and high nibbles of packed bytes widened to 16-bit lanes; span 128 (AVX-512, groups of
// 128 or more) as four quarters [4i | 4i + 1 | 4i + 2 | 4i + 3], the four nibbles of unwidened 16-bit lanes.
struct Int4X {
  std::vector<int16_t> hi, lo;  // (M, K) in nibble order
  std::vector<float> inv, sum;  // (M, K/G): 1 / c_g, and sum_k x_k over the group (fp32, for the minimums)
};

Int4X split_x(const float* x, int64_t M, int64_t K, int64_t G, int64_t span) {
  Int4X s{std::vector<int16_t>(M * K), std::vector<int16_t>(M * K), std::vector<float>(M * K / G),
          std::vector<float>(M * K / G)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < K / G; ++g) {
      const float* xg = x + m * K + g * G;
      float mx = 0.f, sum = 0.f;
      for (int64_t i = 0; i < G; ++i) mx = std::max(mx, std::fabs(xg[i])), sum += xg[i];
      const float c = mx > 0.f ? 16384.f / mx : 0.f;
      s.inv[m * (K / G) + g] = mx > 0.f ? mx / 16384.f : 0.f;
      s.sum[m * (K / G) + g] = sum;
      for (int64_t i = 0; i < G; ++i) {
        const float v = xg[i] * c, h = std::nearbyint(v);
        const int64_t j = i % span, within = span == 128 ? (j % 4) * 32 + j / 4 : (j % 2) * (span / 2) + j / 2;
        const int64_t dst = m * K + g * G + (i - j) + within;
        s.hi[dst] = static_cast<int16_t>(h);
        s.lo[dst] = static_cast<int16_t>(std::nearbyint((v - h) * 16384.f));
      }
    }
  }
  return s;
}

template <int RB>
inline void int4_dot_rows(const int16_t* hi, const int16_t* lo, const float* inv, const float* xsum, const uint8_t* q,
                          const uint16_t* sc, const uint16_t* mn, int64_t K, int64_t G, float* sums) {
  const int64_t groups = K / G;
  const __m256i low = _mm256_set1_epi16(0x0F);
  const __m256 limb = _mm256_set1_ps(1.f / 16384.f);
  const int64_t ahead = prefetch_distance(RB * K / 2);
  __m256 total[RB];
  float offset[RB];
  for (int r = 0; r < RB; ++r) total[r] = _mm256_setzero_ps(), offset[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i a[RB], b[RB];
    for (int r = 0; r < RB; ++r) a[r] = b[r] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      const __m256i he = _mm256_loadu_si256((const __m256i*)(hi + k)), ho = _mm256_loadu_si256((const __m256i*)(hi + k + 16));
      const __m256i le = _mm256_loadu_si256((const __m256i*)(lo + k)), lo_ = _mm256_loadu_si256((const __m256i*)(lo + k + 16));
      for (int r = 0; r < RB; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(q + r * (K / 2) + k / 2) + ahead, _MM_HINT_T0);
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(q + r * (K / 2) + k / 2)));
        const __m256i e = _mm256_and_si256(w, low), o = _mm256_srli_epi16(w, 4);
        a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(_mm256_madd_epi16(e, he), _mm256_madd_epi16(o, ho)));
        b[r] = _mm256_add_epi32(b[r], _mm256_add_epi32(_mm256_madd_epi16(e, le), _mm256_madd_epi16(o, lo_)));
      }
    }
    for (int r = 0; r < RB; ++r) {
      const int64_t i = r * groups + g;
      const __m256 dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b[r]), limb, _mm256_cvtepi32_ps(a[r]));
      total[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(to_f32(sc[i]) * inv[g]), total[r]);
      offset[r] += to_f32(mn[i]) * xsum[g];
    }
  }
  for (int r = 0; r < RB; ++r) sums[r] = hsum(total[r]) + offset[r];
}

struct Int4Args {
  const uint8_t* q;
  const uint16_t* sc;
  const uint16_t* mn;
  int64_t M, N, K, G, groups;
};

Int4Args check_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t group_size, const char* op) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
              qweight.is_contiguous(), op, ": qweight must be a contiguous (N, K/2) uint8 CPU tensor, got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1), G = group_size;
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, op, ": group_size must be a positive multiple of 32 that "
              "divides K = ", K, ", got ", G);
  for (const at::Tensor* t : {&scales, &mins}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->size(0) == N && t->size(1) == K / G &&
                t->is_contiguous(), op, ": scales and mins must be contiguous (N, K/group_size) = (", N, ", ",
                K / G, ") bfloat16, got ", t->scalar_type(), " ", t->sizes());
  }
  check_x(x, K, op);
  return {qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
          reinterpret_cast<const uint16_t*>(mins.data_ptr()), x.size(0), N, K, G, K / G};
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, c10::string_view isa_name) {
  const char* op = "sambay_cpu::linear_int4";
  const Int4Args a = check_int4(x, qweight, scales, mins, group_size, op);
  const std::string name(isa_name);
  // The AVX-512 kernel steps 64 columns within a group; groups of 32 take the AVX2 one under "auto".
  const Isa isa = pick(name == "auto" && a.G % 64 ? "avx2" : name.c_str(), op);
  TORCH_CHECK(isa == Isa::kAvx2 || a.G % 64 == 0, op, ": the avx512 variant needs group_size a multiple of 64, got ",
              a.G);
  const Int4X xs = split_x(x.data_ptr<float>(), a.M, a.K, a.G, isa == Isa::kAvx2 ? 32 : a.G % 128 ? 64 : 128);
  return rows_out(a.M, a.N, a.K, 0.5, [&](float* o, int64_t n0, int64_t n1) {
    if (isa == Isa::kAvx512) {
      int4_limbs_avx512(xs.hi.data(), xs.lo.data(), xs.inv.data(), xs.sum.data(), a.q, a.sc, a.mn, o, a.M, a.N, a.K,
                        a.G, n0, n1);
      return;
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* hi = xs.hi.data() + m * a.K;
      const int16_t* lo = xs.lo.data() + m * a.K;
      const float* inv = xs.inv.data() + m * a.groups;
      const float* sum = xs.sum.data() + m * a.groups;
      for (int64_t n = n0; n < n1;) {
        const uint8_t* qr = a.q + n * (a.K / 2);
        const uint16_t *sc = a.sc + n * a.groups, *mn = a.mn + n * a.groups;
        if (n + 2 <= n1) {
          int4_dot_rows<2>(hi, lo, inv, sum, qr, sc, mn, a.K, a.G, o + m * a.N + n);
          n += 2;
        } else {
          int4_dot_rows<1>(hi, lo, inv, sum, qr, sc, mn, a.K, a.G, o + m * a.N + n);
          n += 1;
        }
      }
    }
  });
}

// ---- 8-bit activations ------------------------------------------------------------------------------------------
// The activation quantized per block of kActBlock columns (isa.h) and laid out for one ISA's chunks.
struct ActQ8Store {
  std::vector<int8_t> q;
  std::vector<float> lanes, gsum;
  ActQ8 view(int64_t Kc) const { return {q.data(), lanes.data(), gsum.data(), Kc}; }
};

// C columns a chunk with L lanes; `nibbles`: each chunk as [even | odd] columns (int4); G: int4's group size
// (the group sums), or 0.
ActQ8Store quantize_x(const float* x, int64_t M, int64_t K, int64_t C, int64_t L, bool nibbles, int64_t G) {
  const int64_t Kc = (K + C - 1) / C * C, chunks = Kc / C, blocks = (K + kActBlock - 1) / kActBlock;
  ActQ8Store s{std::vector<int8_t>(M * Kc, 0), std::vector<float>(M * chunks * L, 0.f),
               std::vector<float>(G ? M * (K / G) : 0, 0.f)};
  std::vector<float> d(blocks);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kActBlock, k1 = std::min(K, k0 + kActBlock);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xm[k]));
      d[b] = amax / 127.f;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = amax > 0.f ? std::nearbyint(xm[k] / d[b]) : 0.f;
        const int64_t j = k % C, pos = nibbles ? k - j + (j % 2) * (C / 2) + j / 2 : k;
        s.q[m * Kc + pos] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
        if (G) s.gsum[m * (K / G) + k / G] += static_cast<float>(std::min(127.f, std::max(-127.f, v))) * d[b];
      }
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t k = c * C + l * (C / L);
        s.lanes[(m * chunks + c) * L + l] = k < K ? d[k / kActBlock] : 0.f;
      }
  }
  return s;
}

// AVX2: 32 columns (one block) a chunk, 4 output rows at a time sharing each activation load. maddubs multiplies
// unsigned by signed bytes into int16 pairs (no saturation: 2 * 127 * 127 < 2^15), madd with ones widens them to
// int32. int8 codes: |x| is the unsigned operand and the weight takes x's sign (codes are in [-127, 127]).
constexpr int kA8Rows = 4;

template <int RB>
inline void int8_a8_rows(const int8_t* xq, const float* lanes, const int8_t* w, int64_t K, float* sums) {
  const int64_t full = K / 32, ahead = prefetch_distance(RB * K);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  auto step = [&](int64_t c, const int8_t* const* rows) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * c));
    const __m256i ax = _mm256_abs_epi8(xv);
    const __m256 d = _mm256_set1_ps(lanes[8 * c]);
    for (int r = 0; r < RB; ++r) {
      const __m256i wv = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r])), xv);
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, wv), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r]);
    }
  };
  const int8_t* rows[RB];
  for (int64_t c = 0; c < full; ++c) {
    for (int r = 0; r < RB; ++r) {
      rows[r] = w + r * K + 32 * c;
      _mm_prefetch(reinterpret_cast<const char*>(rows[r]) + ahead, _MM_HINT_T0);
    }
    step(c, rows);
  }
  if (full * 32 < K) {  // the last, partial chunk: copied into zeros (AVX2 has no masked byte loads)
    alignas(32) int8_t pad[RB][32] = {};
    for (int r = 0; r < RB; ++r) std::memcpy(pad[r], w + r * K + 32 * full, K - 32 * full), rows[r] = pad[r];
    step(full, rows);
  }
  for (int r = 0; r < RB; ++r) sums[r] = hsum(acc[r]);
}

// int4 codes: 32 columns (16 bytes) a chunk, [16 even | 16 odd] as the activation's layout. The block scale is
// applied per chunk, the weight scale per group, the minimums as sum_g min_g * (the group's activation sum).
template <int RB>
inline void int4_a8_rows(const int8_t* xq, const float* lanes, const float* gsum, const uint8_t* q, const uint16_t* sc,
                         const uint16_t* mn, int64_t K, int64_t G, float* sums) {
  const int64_t groups = K / G, half = K / 2, ahead = prefetch_distance(RB * half);
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[RB];
  for (int r = 0; r < RB; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = g * G / 32; c < (g + 1) * G / 32; ++c) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * c));
      const __m256 d = _mm256_set1_ps(lanes[8 * c]);
      for (int r = 0; r < RB; ++r) {
        const uint8_t* p = q + r * half + 16 * c;
        _mm_prefetch(reinterpret_cast<const char*>(p) + ahead, _MM_HINT_T0);
        const __m128i wb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(wb, 4), low), _mm_and_si128(wb, low));
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r]);
      }
    }
    for (int r = 0; r < RB; ++r)
      total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(to_f32(sc[r * groups + g])), total[r]);
  }
  for (int r = 0; r < RB; ++r) {
    float offset = 0.f;
    for (int64_t g = 0; g < groups; ++g) offset += to_f32(mn[r * groups + g]) * gsum[g];
    sums[r] = hsum(total[r]) + offset;
  }
}

void int8_a8_avx2(const ActQ8& a, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N, int64_t K,
                  int64_t n0, int64_t n1) {
  const int64_t chunks = a.Kc / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1;) {
      float sums[kA8Rows];
      const int64_t rows = n + kA8Rows <= n1 ? kA8Rows : 1;
      if (rows == kA8Rows) int8_a8_rows<kA8Rows>(a.q + m * a.Kc, a.lanes + m * chunks * 8, w + n * K, K, sums);
      else int8_a8_rows<1>(a.q + m * a.Kc, a.lanes + m * chunks * 8, w + n * K, K, sums);
      for (int64_t r = 0; r < rows; ++r) out[m * N + n + r] = sums[r] * scale[n + r];
      n += rows;
    }
  }
}

void int4_a8_avx2(const ActQ8& a, const uint8_t* q, const uint16_t* sc, const uint16_t* mn, float* out, int64_t M,
                  int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t chunks = K / 32, groups = K / G;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.q + m * a.Kc;
    const float* lanes = a.lanes + m * chunks * 8;
    const float* gsum = a.gsum + m * groups;
    for (int64_t n = n0; n < n1;) {
      const int64_t rows = n + kA8Rows <= n1 ? kA8Rows : 1;
      const uint8_t* qr = q + n * (K / 2);
      const uint16_t *s = sc + n * groups, *mi = mn + n * groups;
      if (rows == kA8Rows) int4_a8_rows<kA8Rows>(xq, lanes, gsum, qr, s, mi, K, G, out + m * N + n);
      else int4_a8_rows<1>(xq, lanes, gsum, qr, s, mi, K, G, out + m * N + n);
      n += rows;
    }
  }
}

at::Tensor linear_int8_a8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          c10::string_view isa_name) {
  const char* op = "sambay_cpu::linear_int8_a8";
  check_int8(x, qweight, scales, op);
  const Isa isa = pick(std::string(isa_name).c_str(), op);
  const int64_t M = x.size(0), N = qweight.size(0), K = qweight.size(1), C = isa == Isa::kAvx2 ? 32 : 64;
  const ActQ8Store xs = quantize_x(x.data_ptr<float>(), M, K, C, isa == Isa::kAvx2 ? 8 : 16, false, 0);
  const ActQ8 av = xs.view((K + C - 1) / C * C);
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  return rows_out(M, N, K, 1.0, [&](float* o, int64_t n0, int64_t n1) {
    if (isa == Isa::kAvx512) int8_a8_avx512(av, wp, sp, o, M, N, K, n0, n1);
    else int8_a8_avx2(av, wp, sp, o, M, N, K, n0, n1);
  });
}

at::Tensor linear_int4_a8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& mins, int64_t group_size, c10::string_view isa_name) {
  const char* op = "sambay_cpu::linear_int4_a8";
  const Int4Args a = check_int4(x, qweight, scales, mins, group_size, op);
  const Isa isa = pick(std::string(isa_name).c_str(), op);
  const int64_t C = isa == Isa::kAvx2 ? 32 : 128;
  const ActQ8Store xs = quantize_x(x.data_ptr<float>(), a.M, a.K, C, isa == Isa::kAvx2 ? 8 : 16, true, a.G);
  const ActQ8 av = xs.view((a.K + C - 1) / C * C);
  return rows_out(a.M, a.N, a.K, 0.5, [&](float* o, int64_t n0, int64_t n1) {
    if (isa == Isa::kAvx512) int4_a8_avx512(av, a.q, a.sc, a.mn, o, a.M, a.N, a.K, a.G, n0, n1);
    else int4_a8_avx2(av, a.q, a.sc, a.mn, o, a.M, a.N, a.K, a.G, n0, n1);
  });
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  if (has_avx512()) out.push_back(has_avx512_bf16() ? "avx512+bf16" : "avx512");
  if (has_avx2()) out.push_back("avx2");
  return out;
}

}  // namespace

namespace sambay_isa {

bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

Isa pick(const char* requested, const char* op) {
  const std::string r(requested);
  if (r == "avx512" || (r == "auto" && has_avx512())) {
    TORCH_CHECK(has_avx512(), op, ": isa 'avx512' needs AVX-512 F/BW/VL/DQ and VNNI, which this CPU lacks");
    return Isa::kAvx512;
  }
  TORCH_CHECK(r == "avx2" || r == "auto", op, ": isa must be 'auto', 'avx2' or 'avx512', got '", r, "'");
  TORCH_CHECK(has_avx2(), op, ": the kernels need AVX2 and FMA, which this CPU lacks");
  return Isa::kAvx2;
}

}  // namespace sambay_isa

TORCH_LIBRARY(sambay_cpu, m) {
  m.def("linear_dense(Tensor x, Tensor weight, str isa=\"auto\") -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales, str isa=\"auto\") -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size, str isa=\"auto\") "
        "-> Tensor");
  m.def("linear_int8_a8(Tensor x, Tensor qweight, Tensor scales, str isa=\"auto\") -> Tensor");
  m.def("linear_int4_a8(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size, str isa=\"auto\") "
        "-> Tensor");
  m.def("isas() -> str[]", &isas);
}

TORCH_LIBRARY_IMPL(sambay_cpu, CPU, m) {
  m.impl("linear_dense", &linear_dense);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_int8_a8", &linear_int8_a8);
  m.impl("linear_int4_a8", &linear_int4_a8);
}
