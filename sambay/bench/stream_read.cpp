// The fastest plain read of a buffer this project can write: the floor of memory-bound decode steps.
// Built by sambay/bench/bandwidth.py with -O3 -march=native (AVX-512 where the CPU has it, else AVX2, else scalar),
// called through ctypes. std::thread rather than OpenMP: no second OpenMP runtime in the calling process.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// Sum of the floats in [p, p + n) with independent accumulators (n a multiple of 64, p 64-byte aligned);
// the sum is returned so the loads cannot be dropped.
float read_chunk(const float* p, size_t n) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__)
    __m256 a[8];
    for (auto& x : a) x = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 64)
        for (int j = 0; j < 8; ++j) a[j] = _mm256_add_ps(a[j], _mm256_load_ps(p + i + 8 * j));
    alignas(32) float out[8];
    for (int j = 1; j < 8; ++j) a[0] = _mm256_add_ps(a[0], a[j]);
    _mm256_store_ps(out, a[0]);
    float s = 0;
    for (float x : out) s += x;
    return s;
#else
    float s[8] = {0};
    for (size_t i = 0; i < n; i += 8)
        for (int j = 0; j < 8; ++j) s[j] += p[i + j];
    float t = 0;
    for (float x : s) t += x;
    return t;
#endif
}

}  // namespace

extern "C" {

// What the build used: 512, 256 or 0 (scalar).
int sambay_stream_read_width() {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

// Allocates `bytes` (rounded down to whole 64-float blocks per thread), writes it once from the threads that will
// read it (first touch places the pages), then times `repeats` reads of the whole buffer by `threads` threads, each
// reading its own contiguous share. seconds_out gets each repeat's wall time. Returns the bytes read per repeat,
// or 0 when the buffer could not be allocated.
uint64_t sambay_stream_read(uint64_t bytes, int threads, int repeats, double* seconds_out) {
    if (threads < 1) threads = 1;
    const size_t per = (bytes / sizeof(float) / threads) / 64 * 64;  // floats per thread
    const size_t n = per * threads;
    if (n == 0) return 0;
    float* buf = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
    if (!buf) return 0;
    std::vector<float> sink(threads);
    auto run = [&](bool fill) {
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                float* p = buf + t * per;
                if (fill) {
                    for (size_t i = 0; i < per; ++i) p[i] = 1.0f;
                } else {
                    sink[t] += read_chunk(p, per);
                }
            });
        for (auto& th : pool) th.join();
    };
    run(true);
    run(false);  // warm: page tables, TLB
    for (int r = 0; r < repeats; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        run(false);
        seconds_out[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    volatile float keep = 0;
    for (float s : sink) keep = keep + s;
    std::free(buf);
    return n * sizeof(float);
}

}  // extern "C"
