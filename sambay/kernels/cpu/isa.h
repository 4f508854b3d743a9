// The instruction sets sambay's CPU kernels are built for, and the AVX-512 kernels that the ops (cpu_linear.cpp,
// cpu_diff_decode.cpp) dispatch to. Each linear kernel computes rows [n0, n1) of out (M, N) fp32 for all M rows.
//
// Two variants exist: "avx2" (AVX2 + FMA + F16C, the whole extension is compiled for it) and "avx512" (AVX-512
// F/BW/VL/DQ + VNNI, compiled per function in cpu_linear_avx512.cpp and cpu_diff_decode_avx512.cpp; the
// bf16-activation kernels also need AVX512-BF16).
// Which one runs is chosen per call from the CPU's features (cpuid), or named by the caller (the tests run both).
#pragma once

#include <cstdint>

namespace sambay_isa {

enum class Isa { kAvx2, kAvx512 };

bool has_avx2();
bool has_avx512();       // F, BW, VL, DQ and VNNI: every kernel of the avx512 variant
bool has_avx512_bf16();  // vdpbf16ps, for bf16 activations against bf16 weights

// "auto" -> the widest available; "avx2" / "avx512" -> that one, or an error naming what the CPU lacks.
Isa pick(const char* requested, const char* op);

// Activations quantized to 8 bits per block of kActBlock columns (as llama.cpp's Q8_0): d = max|x| / 127 in fp32,
// q = round-half-even(x / d) (fp32 division), 0 for an all-zero block. Prepared once per call for one ISA's
// chunk layout: chunks of C columns (the last zero-padded), each with L fp32 lane scales, lane l covering columns
// [c0 + l C/L, c0 + (l+1) C/L) of the chunk (all in one block); int4 stores each chunk as [even | odd] columns.
constexpr int64_t kActBlock = 32;

struct ActQ8 {
  const int8_t* q;     // (M, Kc) quantized activations in the chunk layout, Kc = K rounded up to C
  const float* lanes;  // (M, Kc / C, L) the block scale of each lane
  const float* gsum;   // (M, K / G) int4 only: sum of the dequantized activations over each weight group
  int64_t Kc;
};

// ---- avx512 (linear/cpu_linear_avx512.cpp) -----------------------------------------------------------------
// x (M, K) fp32; w (N, K) bf16 / fp16 / int8 (scale: (N,) fp32 or nullptr)
void dense_bf16_avx512(const float* x, const uint16_t* w, float* out, int64_t M, int64_t N, int64_t K, int64_t n0,
                       int64_t n1);
void dense_f16_avx512(const float* x, const uint16_t* w, float* out, int64_t M, int64_t N, int64_t K, int64_t n0,
                      int64_t n1);
void dense_int8_avx512(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N,
                       int64_t K, int64_t n0, int64_t n1);
// x (M, K) bf16 against w (N, K) bf16 with vdpbf16ps (needs has_avx512_bf16())
void dense_bf16x_avx512(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t N, int64_t K,
                        int64_t n0, int64_t n1);
// int4 weight-only: x split into int16 limbs (cpu_linear.cpp's split_x): G a multiple of 128 in the layout of
// 128-column steps ([nibble 0 | 1 | 2 | 3] of each 16-bit lane), else G a multiple of 64 in 64-column steps
// ([32 even | 32 odd])
void int4_limbs_avx512(const int16_t* hi, const int16_t* lo, const float* inv, const float* xsum, const uint8_t* q,
                       const uint16_t* sc, const uint16_t* mn, float* out, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t n0, int64_t n1);
// 8-bit activations (VNNI vpdpbusd): int8 chunks C = 64, L = 16; int4 chunks C = 128, L = 16
void int8_a8_avx512(const ActQ8& a, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N, int64_t K,
                    int64_t n0, int64_t n1);
void int4_a8_avx512(const ActQ8& a, const uint8_t* q, const uint16_t* sc, const uint16_t* mn, float* out, int64_t M,
                    int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1);

// ---- decode attention, avx512 (diff_decode/cpu_diff_decode_avx512.cpp): kind is the K/V dtype ----------------
enum KvKind { kKvBf16 = 0, kKvF16 = 1, kKvF32 = 2 };
// sc[r * S + s] = <q row r (R, D) fp32, key s> (keys of stride k_stride elements)
void diff_scores_avx512(int kind, const float* q, const void* k, float* sc, int64_t R, int64_t D, int64_t S,
                        int64_t k_stride);
// out (R, E) += p (R, S) @ v (S, E) (rows of stride v_stride elements)
void diff_pv_avx512(int kind, const float* p, const void* v, float* out, int64_t R, int64_t S, int64_t E,
                    int64_t v_stride);

}  // namespace sambay_isa
