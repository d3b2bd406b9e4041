// Shared helpers for the featup CUDA kernels (compiled by NVRTC through CuPy, or by nvcc in the compile check).
// No CUDA headers are needed: half and bfloat16 are carried as 16-bit storage structs and converted with PTX /
// bit operations, so NVRTC needs no include path on the target machine. All arithmetic is float32.
#pragma once

struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<half_t>(half_t v) {
#ifdef FEATUP_HOST_EMULATION  // tests/test_kernel_sources_compile.py runs these kernels on the CPU (g++ _Float16)
    _Float16 h;
    __builtin_memcpy(&h, &v.bits, 2);
    return (float)h;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}
template <> __device__ __forceinline__ float to_float<bf16_t>(bf16_t v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
    half_t r;
#ifdef FEATUP_HOST_EMULATION
    _Float16 h = (_Float16)f;
    __builtin_memcpy(&r.bits, &h, 2);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
#endif
    return r;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
    // round to nearest even; NaN stays a (quiet) NaN
    unsigned int u = __float_as_uint(f);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (unsigned short)(u >> 16);
    }
    return r;
}

// ---- vectorised loads (jbu_fused_forward_vec) ----
// Raw 4/8/16-byte words, loaded in one instruction (LDG.32/.64/.128) and unpacked to float32 in registers. The
// caller guarantees the alignment (the kernels test the base pointers and strides once and otherwise take a scalar
// path); the host emulation counts any misaligned vector load (featup_emu_misaligned) so the tests can fail on it.
struct alignas(8) featup_u32x2 { unsigned int x, y; };
struct alignas(16) featup_u32x4 { unsigned int x, y, z, w; };

#ifdef FEATUP_HOST_EMULATION
extern long long featup_emu_misaligned;        // vector loads whose address was not a multiple of their width
extern long long featup_emu_path[4];           // which load path each (thread, z step) took, see FEATUP_EMU_PATH
#define FEATUP_EMU_CHECK_ALIGN(p, bytes) \
    (featup_emu_misaligned += ((unsigned long long)(const void*)(p) % (bytes)) != 0)
#define FEATUP_EMU_PATH(i) (++featup_emu_path[i])
#else
#define FEATUP_EMU_CHECK_ALIGN(p, bytes) ((void)0)
#define FEATUP_EMU_PATH(i) ((void)0)
#endif

__device__ __forceinline__ bool featup_aligned(const void* p, int bytes) {
    return ((unsigned long long)p % (unsigned long long)bytes) == 0;
}

// One 32-bit word holding 32 / (8*sizeof(T)) elements of T, in memory order (little-endian: element 0 = low bits).
template <typename T> __device__ __forceinline__ void unpack_word(unsigned int w, float* out);
template <> __device__ __forceinline__ void unpack_word<float>(unsigned int w, float* out) {
    out[0] = __uint_as_float(w);
}
template <> __device__ __forceinline__ void unpack_word<half_t>(unsigned int w, float* out) {
    half_t lo, hi;
    lo.bits = (unsigned short)(w & 0xffffu);
    hi.bits = (unsigned short)(w >> 16);
    out[0] = to_float(lo);
    out[1] = to_float(hi);
}
template <> __device__ __forceinline__ void unpack_word<bf16_t>(unsigned int w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
}

// Elements of T in one 16-byte load: 4 floats or 8 halves / bfloat16s.
template <typename T> struct featup_vec16 { static constexpr int N = 16 / (int)sizeof(T); };

// out[0..N) = p[0..N), N = featup_vec16<T>::N, with one 16-byte load; p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load16_as_float(const T* __restrict__ p, float* out) {
    FEATUP_EMU_CHECK_ALIGN(p, 16);
    const featup_u32x4 q = *reinterpret_cast<const featup_u32x4*>(p);
    constexpr int per_word = 4 / (int)sizeof(T);
    unpack_word<T>(q.x, out);
    unpack_word<T>(q.y, out + per_word);
    unpack_word<T>(q.z, out + 2 * per_word);
    unpack_word<T>(q.w, out + 3 * per_word);
}

// (a, b) = (p[0], p[1]) with one load of 2*sizeof(T) bytes (4 for 16-bit types, 8 for float); p aligned to that.
template <typename T>
__device__ __forceinline__ void load_pair_as_float(const T* __restrict__ p, float& a, float& b) {
    FEATUP_EMU_CHECK_ALIGN(p, 2 * sizeof(T));
    float v[2];
    if constexpr (sizeof(T) == 2) {
        unpack_word<T>(*reinterpret_cast<const unsigned int*>(p), v);
    } else {
        const featup_u32x2 q = *reinterpret_cast<const featup_u32x2*>(p);
        unpack_word<T>(q.x, v);
        unpack_word<T>(q.y, v + 1);
    }
    a = v[0];
    b = v[1];
}

// Channels handled per thread: each tap's weight is loaded once and applied to FEATUP_CPT channels.
#define FEATUP_CPT 4
// Largest tap count per side the kernels support (grad_filter keeps one accumulator per tap of a row).
#define FEATUP_MAX_K 15

// The JBU window sum of one output pixel for up to FEATUP_CPT channels, accumulated in float32 and stored as T:
//   op[cc * out_plane] = sum_{i,j<K} wk[i*K + j] * xp[cc * in_plane + i*Wp + j]   for cc < nc
// xp points at the window's top-left input element of the first channel, wk at the pixel's K*K weights (T in
// global memory for adaptive_conv_forward, float in shared memory for jbu_fused_forward).
template <typename T, typename WT>
__device__ __forceinline__ void window_sum_store(const T* __restrict__ xp, const WT* __restrict__ wk,
                                                 T* __restrict__ op, long long in_plane, long long out_plane,
                                                 int Wp, int K, int nc) {
    float acc[FEATUP_CPT];
#pragma unroll
    for (int cc = 0; cc < FEATUP_CPT; ++cc) acc[cc] = 0.f;
    for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K; ++j) {
            const float wv = to_float(wk[i * K + j]);
            const long long off = (long long)i * Wp + j;
#pragma unroll
            for (int cc = 0; cc < FEATUP_CPT; ++cc)
                if (cc < nc) acc[cc] += wv * to_float(xp[cc * in_plane + off]);
        }
    }
#pragma unroll
    for (int cc = 0; cc < FEATUP_CPT; ++cc)
        if (cc < nc) op[cc * out_plane] = from_float<T>(acc[cc]);
}
