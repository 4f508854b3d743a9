// sambay's CPU kernels for decode attention: a few query rows against a long K/V cache, read in its own dtype.
//
// At long context a decode step's attention is bound by reading K and V; converting them to fp32 first (what a
// matmul-based twin must do on CPUs without native bf16) writes and re-reads twice their size. These kernels
// convert each K/V element in registers and accumulate in fp32. The softmax between them runs in PyTorch on the
// small fp32 score tensor (sambay/kernels/cpu_native.py: diff_decode_cpu).
//
//   decode_scores(q (B, G, 2, R, D) fp32 contiguous, k (B, 2, G, S, D) bf16/fp16/fp32, unit last stride)
//       -> (B, G, 2, R, S) fp32: scores[b, g, m, r, s] = <q[b, g, m, r], k[b, m, g, s]>
//   decode_pv(p (B, G, M, S) fp32 contiguous, v (B, G, S, E) bf16/fp16/fp32, unit last stride, splits)
//       -> (B, G, splits, M, E) fp32 partial sums over the key ranges of each split (the caller sums them)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

using namespace sambay_simd;

constexpr int64_t kChunk = 512;  // keys per parallel task of decode_scores

// Scores of keys [s0, s1) for the R query rows. qv (R, d16): q's first d16 dims in load16's order for T; the
// D - d16 tail dims come from q (R, D). Keys are taken 4 at a time so four dot products share one reduction.
template <typename T>
void scores_task(const float* qv, const float* q, const T* k, float* out, int64_t R, int64_t D, int64_t d16,
                 int64_t S, int64_t s0, int64_t s1, int64_t k_stride) {
  int64_t s = s0;
  for (; s + 4 <= s1 && d16 == D; s += 4) {
    const T* k0 = k + s * k_stride;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = qv + r * d16;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t d = 0; d < D; d += 16) {
        const __m256 x0 = _mm256_loadu_ps(qr + d), x1 = _mm256_loadu_ps(qr + d + 8);
        for (int j = 0; j < 4; ++j) {
          __m256 a, b;
          load16(k0 + j * k_stride + d, a, b);
          acc[j] = _mm256_fmadd_ps(a, x0, _mm256_fmadd_ps(b, x1, acc[j]));
        }
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      _mm_storeu_ps(out + r * S + s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
  for (; s < s1; ++s) {
    const T* kr = k + s * k_stride;
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < d16; d += 16) {
        __m256 a, b;
        load16(kr + d, a, b);
        acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(qv + r * d16 + d),
                              _mm256_fmadd_ps(b, _mm256_loadu_ps(qv + r * d16 + d + 8), acc));
      }
      float x = hsum(acc);
      for (int64_t d = d16; d < D; ++d) x += q[r * D + d] * to_f32(kr[d]);
      out[r * S + s] = x;
    }
  }
}

// The last dim of a contiguous fp32 tensor, first d16 entries only, in load16's order when ``permuted``.
at::Tensor vector_part(const at::Tensor& x, int64_t d16, bool permuted) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  at::Tensor head = x.reshape({rows, D}).narrow(1, 0, d16);
  if (!permuted) return head.contiguous();
  return head.reshape({rows, d16 / 16, 2, 2, 4}).transpose(2, 3).contiguous().view({rows, d16});
}

template <typename T>
at::Tensor scores(const at::Tensor& q, const at::Tensor& k) {
  const int64_t B = k.size(0), G = k.size(2), S = k.size(3), D = k.size(4), R = q.size(3);
  const int64_t d16 = D - D % 16;
  at::Tensor qv = vector_part(q, d16, Permuted<T>::value);
  at::Tensor out = at::empty({B, G, 2, R, S}, q.options());
  const float* qvp = qv.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t chunks = (S + kChunk - 1) / kChunk, tasks = B * G * 2 * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chunks, m = (t / chunks) % 2, g = (t / chunks / 2) % G, b = t / chunks / 2 / G;
      const int64_t s0 = c * kChunk, s1 = std::min(S, s0 + kChunk);
      const int64_t row = ((b * G + g) * 2 + m) * R;
      const T* kbg = kp + b * k.stride(0) + m * k.stride(1) + g * k.stride(2);
      scores_task<T>(qvp + row * d16, qp + row * D, kbg, op + row * S, R, D, d16, S, s0, s1, k.stride(3));
    }
  });
  return out;
}

at::Tensor decode_scores(const at::Tensor& q, const at::Tensor& k) {
  const char* op = "sambay_cpu::decode_scores";
  TORCH_CHECK(k.device().is_cpu() && k.dim() == 5 && k.size(1) == 2 && k.stride(4) == 1, op,
              ": k must be a (B, 2, G, S, D) CPU tensor with unit last stride, got ", k.sizes(), " strides ",
              k.strides());
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 5 &&
              q.size(0) == k.size(0) && q.size(1) == k.size(2) && q.size(2) == 2 && q.size(4) == k.size(4), op,
              ": q must be contiguous fp32 (B, G, 2, R, D) matching k ", k.sizes(), ", got ", q.scalar_type(), " ",
              q.sizes());
  if (k.scalar_type() == at::kBFloat16) return scores<uint16_t>(q, k);
  if (k.scalar_type() == at::kHalf) return scores<f16>(q, k);
  TORCH_CHECK(k.scalar_type() == at::kFloat, op, ": k must be bfloat16, float16 or float32, got ", k.scalar_type());
  return scores<float>(q, k);
}

// Rows [m0, m0 + MB) of p against keys [t0, t1) of v, columns [e, e + 16), accumulated into out. MB is a
// compile-time count so the accumulators stay in registers; they hold columns in load16's order for T.
template <typename T, int MB>
inline void pv_block(const float* p, const T* v, float* out, int64_t m0, int64_t S, int64_t E, int64_t t0,
                     int64_t t1, int64_t e, int64_t v_stride) {
  __m256 acc[MB][2];
  for (int i = 0; i < MB; ++i) {
    acc[i][0] = _mm256_loadu_ps(out + (m0 + i) * E + e);
    acc[i][1] = _mm256_loadu_ps(out + (m0 + i) * E + e + 8);
    if (Permuted<T>::value) swap_lanes(acc[i][0], acc[i][1]);
  }
  for (int64_t s = t0; s < t1; ++s) {
    __m256 v0, v1;
    load16(v + s * v_stride + e, v0, v1);
    for (int i = 0; i < MB; ++i) {
      const __m256 w = _mm256_broadcast_ss(p + (m0 + i) * S + s);
      acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    if (Permuted<T>::value) swap_lanes(acc[i][0], acc[i][1]);
    _mm256_storeu_ps(out + (m0 + i) * E + e, acc[i][0]);
    _mm256_storeu_ps(out + (m0 + i) * E + e + 8, acc[i][1]);
  }
}

// One task: rows [0, M) of p against keys [s0, s1) of v, all E columns, into out (M, E). Keys are taken in
// tiles small enough to stay in L1 while each 16-column block of the tile is accumulated for 4 rows at a time.
template <typename T>
void pv_task(const float* p, const T* v, float* out, int64_t M, int64_t S, int64_t E, int64_t s0, int64_t s1,
             int64_t v_stride) {
  constexpr int64_t kTile = 32;
  const int64_t e16 = E - E % 16;
  for (int64_t t0 = s0; t0 < s1; t0 += kTile) {
    const int64_t t1 = std::min(s1, t0 + kTile);
    for (int64_t e = 0; e < e16; e += 16) {
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) pv_block<T, 4>(p, v, out, m0, S, E, t0, t1, e, v_stride);
      for (; m0 < M; ++m0) pv_block<T, 1>(p, v, out, m0, S, E, t0, t1, e, v_stride);
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t e = e16; e < E; ++e) {
        float x = out[m * E + e];
        for (int64_t s = t0; s < t1; ++s) x += p[m * S + s] * to_f32(v[s * v_stride + e]);
        out[m * E + e] = x;
      }
    }
  }
}

template <typename T>
at::Tensor pv(const at::Tensor& p, const at::Tensor& v, int64_t splits) {
  const int64_t B = v.size(0), G = v.size(1), S = v.size(2), E = v.size(3), M = p.size(2);
  at::Tensor out = at::zeros({B, G, splits, M, E}, p.options());
  const float* pp = p.data_ptr<float>();
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t len = (S + splits - 1) / splits;
  at::parallel_for(0, B * G * splits, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % splits, g = (t / splits) % G, b = t / splits / G;
      const int64_t s0 = std::min(S, c * len), s1 = std::min(S, s0 + len);
      pv_task<T>(pp + (b * G + g) * M * S, vp + b * v.stride(0) + g * v.stride(1), op + t * M * E, M, S, E, s0, s1,
                 v.stride(2));
    }
  });
  return out;
}

at::Tensor decode_pv(const at::Tensor& p, const at::Tensor& v, int64_t splits) {
  const char* op = "sambay_cpu::decode_pv";
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 4 && v.stride(3) == 1, op,
              ": v must be a (B, G, S, E) CPU tensor with unit last stride, got ", v.sizes(), " strides ", v.strides());
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 4 &&
              p.size(0) == v.size(0) && p.size(1) == v.size(1) && p.size(3) == v.size(2), op,
              ": p must be contiguous fp32 (B, G, M, S) matching v ", v.sizes(), ", got ", p.scalar_type(), " ",
              p.sizes());
  TORCH_CHECK(splits >= 1, op, ": splits must be >= 1, got ", splits);
  if (v.scalar_type() == at::kBFloat16) return pv<uint16_t>(p, v, splits);
  if (v.scalar_type() == at::kHalf) return pv<f16>(p, v, splits);
  TORCH_CHECK(v.scalar_type() == at::kFloat, op, ": v must be bfloat16, float16 or float32, got ", v.scalar_type());
  return pv<float>(p, v, splits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sambay_cpu, m) {
  m.def("decode_scores(Tensor q, Tensor k) -> Tensor");
  m.def("decode_pv(Tensor p, Tensor v, int splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(sambay_cpu, CPU, m) {
  m.impl("decode_scores", &decode_scores);
  m.impl("decode_pv", &decode_pv);
}
