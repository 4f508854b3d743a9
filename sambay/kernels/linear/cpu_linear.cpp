// sambay's CPU kernels for decode-sized linears (a few rows of activations against a large weight):
// y = x W^T with W in bf16, fp16, int8 (per output channel scale) or int4 (per group scale and minimum).
//
// At batch 1 a linear reads every weight byte once per token and does 2 flops per weight, so its speed is the
// speed at which the weight streams from memory. These kernels convert each weight to fp32 in registers and
// accumulate in fp32 (AVX2 + FMA), never writing a converted copy; rows are split over ATen's thread pool.
// Their plain-PyTorch twins (dequantize, then matmul) are in sambay/kernels/quant_ref.py and ops.py.
//
// Shapes: x (M, K) fp32 contiguous; W (N, K) contiguous (int4: (N, K/2) bytes, element 2j in the low nibble
// of byte j, 2j+1 in the high one); scales (N,) fp32 (int8) or (N, K/G) bf16 (int4), mins (N, K/G) bf16.
// int8: w = q * scale.  int4: w = q * scale + min, q in [0, 15].  Returns (M, N) fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace sambay_simd;

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

at::Tensor linear_dense(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "sambay_cpu::linear_dense: the weight "
              "must be a contiguous 2-D CPU tensor, got ", w.sizes());
  check_x(x, w.size(1), "sambay_cpu::linear_dense");
  if (w.scalar_type() == at::kBFloat16) return dense<uint16_t>(x, w, nullptr, 2.0);
  TORCH_CHECK(w.scalar_type() == at::kHalf, "sambay_cpu::linear_dense: weight dtype must be bfloat16 or float16 "
              "(fp32 linears are ATen's), got ", w.scalar_type());
  return dense<f16>(x, w, nullptr, 2.0);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
              qweight.is_contiguous(), "sambay_cpu::linear_int8: qweight must be a contiguous (N, K) int8 CPU "
              "tensor, got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == qweight.size(0) &&
              scales.is_contiguous(), "sambay_cpu::linear_int8: scales must be contiguous (N,) fp32, got ",
              scales.scalar_type(), " ", scales.sizes());
  check_x(x, qweight.size(1), "sambay_cpu::linear_int8");
  return dense<int8_t>(x, qweight, scales.data_ptr<float>(), 1.0);
}

// int4: for each group of G weights of a row, sum_k x_k (q_k s + mn) = s * sum_k x_k q_k + mn * sum_k x_k.
//
// Widening every nibble to fp32 costs a conversion and a multiply-add per weight, which made this kernel compute-bound
// at ~3.5x its read time. Instead x is split once per call, per group, into two int16 limbs: with
// c_g = 2^14 / max|x_g|, x c_g = hi + lo 2^-14 + e, |hi| <= 2^14, |lo| <= 2^13, |e| <= 2^-15 (x's value is kept to
// 2^-29 of the group's largest |x|, far below fp32 rounding of the sum). Then sum_k q_k x_k = (A + B 2^-14) / c_g
// with A = sum q hi and B = sum q lo exact int32 sums (vpmaddwd: 16 products per instruction, no conversion); they
// are converted to fp32 once per group. The limbs are stored per 32 columns as [16 even | 16 odd], matching the
// low and high nibbles of 16 packed bytes widened to 16-bit lanes.
struct Int4X {
  std::vector<int16_t> hi, lo;  // (M, K) in nibble order
  std::vector<float> inv, sum;  // (M, K/G): 1 / c_g, and sum_k x_k over the group (fp32, for the minimums)
};

Int4X split_x(const float* x, int64_t M, int64_t K, int64_t G) {
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
        const int64_t j = i % 32, dst = m * K + g * G + (i - j) + (j % 2) * 16 + j / 2;  // [evens | odds] per 32
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

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size) {
  const char* op = "sambay_cpu::linear_int4";
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
  const int64_t M = x.size(0), groups = K / G;
  const Int4X xs = split_x(x.data_ptr<float>(), M, K, G);
  at::Tensor out = at::empty({M, N}, x.options());
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const uint16_t* scp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* mnp = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, N, grain(K, 0.5), [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* hi = xs.hi.data() + m * K;
      const int16_t* lo = xs.lo.data() + m * K;
      const float* inv = xs.inv.data() + m * groups;
      const float* sum = xs.sum.data() + m * groups;
      for (int64_t n = n0; n < n1;) {
        const uint8_t* qr = qp + n * (K / 2);
        if (n + 2 <= n1) {
          int4_dot_rows<2>(hi, lo, inv, sum, qr, scp + n * groups, mnp + n * groups, K, G, outp + m * N + n);
          n += 2;
        } else {
          int4_dot_rows<1>(hi, lo, inv, sum, qr, scp + n * groups, mnp + n * groups, K, G, outp + m * N + n);
          n += 1;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(sambay_cpu, m) {
  m.def("linear_dense(Tensor x, Tensor weight) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(sambay_cpu, CPU, m) {
  m.impl("linear_dense", &linear_dense);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
}
