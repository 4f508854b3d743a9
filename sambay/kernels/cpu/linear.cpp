// sambay's CPU kernels for decode-sized linears (a few rows of activations against a large weight):
// y = x W^T with W in bf16, fp16, fp32, int8 (per output channel scale) or int4 (per group scale and minimum).
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
#include <cstdint>

#include "simd.h"

namespace {

using namespace sambay_simd;

constexpr int64_t kRows = 4;  // output rows per inner block: each x vector loaded once serves 4 rows

// sums[r] = <xv, w row r> over the first k16 columns, for RB consecutive rows (row stride K). Accumulators are
// locals of this function alone, so they stay in registers (sharing them with a tail loop made GCC spill them).
template <typename W, int RB>
inline void dot_rows(const float* xv, const W* w, int64_t K, int64_t k16, float* sums) {
  __m256 acc[RB][2];
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k16; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(xv + k), x1 = _mm256_loadu_ps(xv + k + 8);
    for (int r = 0; r < RB; ++r) {
      __m256 a, b;
      load16(w + r * K + k, a, b);
      acc[r][0] = _mm256_fmadd_ps(a, x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, x1, acc[r][1]);
    }
  }
  for (int r = 0; r < RB; ++r) sums[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
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
  if (w.scalar_type() == at::kHalf) return dense<f16>(x, w, nullptr, 2.0);
  TORCH_CHECK(w.scalar_type() == at::kFloat, "sambay_cpu::linear_dense: weight dtype must be bfloat16, float16 "
              "or float32, got ", w.scalar_type());
  return dense<float>(x, w, nullptr, 4.0);
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
// x is first reordered per 32 columns into [the 16 even columns | the 16 odd ones], matching the low and high
// nibbles of 16 packed bytes; the per-group sums of x are computed once per call.
void int4_rows(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* sc, const uint16_t* mn,
               float* out, int64_t M, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xp + m * K;
    const float* sm = xsum + m * groups;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qr = q + n * (K / 2);
      __m256 total = _mm256_setzero_ps();
      float offset = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          const __m128i b = _mm_loadu_si128((const __m128i*)(qr + k / 2));
          const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
          const float* xk = xm + k;
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xk), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                                 _mm256_loadu_ps(xk + 8), acc1);
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xk + 16), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                                 _mm256_loadu_ps(xk + 24), acc1);
        }
        const int64_t i = n * groups + g;
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(to_f32(sc[i])), total);
        offset += to_f32(mn[i]) * sm[g];
      }
      out[m * N + n] = hsum(total) + offset;
    }
  }
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
  const int64_t M = x.size(0);
  // x reordered to the nibble order, and its per-group sums.
  at::Tensor xr = x.view({M, K / 32, 16, 2}).transpose(2, 3).contiguous();
  at::Tensor xsum = x.view({M, K / G, G}).sum(-1).contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = xr.data_ptr<float>();
  const float* sp = xsum.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const uint16_t* scp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* mnp = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, N, grain(K, 0.5), [&](int64_t n0, int64_t n1) {
    int4_rows(xp, sp, qp, scp, mnp, outp, M, N, K, G, n0, n1);
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
