// Host emulation of the CUDA kernels in kernels/*.cu: every (block, thread) of a launch runs sequentially on the
// CPU with blockIdx/threadIdx set as the GPU would. The kernels use no __syncthreads, warp intrinsics or atomics,
// so this executes exactly their index arithmetic, bounds checks, grid-stride loops and float32 accumulation.
// Vector loads (featup_u32x2/x4 words) run as plain loads here; featup_common.cuh counts the misaligned ones, which
// x86 would tolerate but a GPU would not, in featup_emu_misaligned.
// Built by tests/test_kernel_sources_compile.py with g++ (-DFEATUP_HOST_EMULATION) and called through ctypes.
#include <algorithm>
#include <cmath>
#include <cstring>

struct featup_dim3 { unsigned int x, y, z; };
static featup_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __restrict__
using std::max;
using std::min;
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
float featup_smem[1 << 16];
long long featup_emu_misaligned = 0;
long long featup_emu_path[4] = {0, 0, 0, 0};

#include "adaptive_conv.cu"
#include "jbu_fused.cu"

template <typename F>
static void run(const int* g, const int* b, F kernel) {
    gridDim = {(unsigned)g[0], (unsigned)g[1], (unsigned)g[2]};
    blockDim = {(unsigned)b[0], (unsigned)b[1], (unsigned)b[2]};
    for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
            for (unsigned bx = 0; bx < gridDim.x; ++bx)
                for (unsigned tz = 0; tz < blockDim.z; ++tz)
                    for (unsigned ty = 0; ty < blockDim.y; ++ty)
                        for (unsigned tx = 0; tx < blockDim.x; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            kernel();
                        }
}

template <typename T, int KC>
static void fused_vec(void** p, const int* n) {
    jbu_fused_forward_vec<T, KC>((const T*)p[0], (const T*)p[1], (const float*)p[2], (const float*)p[3], (T*)p[4],
                                 n[0], n[1], n[2], n[3], n[4], n[5], n[6]);
}

template <typename T>
static int launch_t(const char* kernel, const int* g, const int* b, void** p, const int* n) {
    if (!std::strcmp(kernel, "adaptive_conv_forward"))
        run(g, b, [&] { adaptive_conv_forward<T>((const T*)p[0], (const T*)p[1], (T*)p[2], n[0], n[1], n[2], n[3], n[4]); });
    else if (!std::strcmp(kernel, "adaptive_conv_grad_input"))
        run(g, b, [&] { adaptive_conv_grad_input<T>((const T*)p[0], (const T*)p[1], (T*)p[2], n[0], n[1], n[2], n[3], n[4]); });
    else if (!std::strcmp(kernel, "adaptive_conv_grad_filter"))
        run(g, b, [&] { adaptive_conv_grad_filter<T>((const T*)p[0], (const T*)p[1], (T*)p[2], n[0], n[1], n[2], n[3], n[4]); });
    else if (!std::strcmp(kernel, "jbu_fused_forward"))
        run(g, b, [&] {
            jbu_fused_forward<T>((const T*)p[0], (const T*)p[1], (const float*)p[2], (const float*)p[3], (T*)p[4],
                                 n[0], n[1], n[2], n[3], n[4], n[5], n[6]);
        });
    else if (!std::strcmp(kernel, "jbu_fused_forward_vec"))  // n[7]: the compile-time K (0 = run-time K); 3 and 5
                                                              // are not in FUSED_VEC_FIXED_K but cost nothing here
        switch (n[7]) {
            case 0: run(g, b, [&] { fused_vec<T, 0>(p, n); }); break;
            case 3: run(g, b, [&] { fused_vec<T, 3>(p, n); }); break;
            case 5: run(g, b, [&] { fused_vec<T, 5>(p, n); }); break;
            case 7: run(g, b, [&] { fused_vec<T, 7>(p, n); }); break;
            default: return 3;
        }
    else
        return 1;
    return 0;
}

// Counters of the vectorised kernels (featup_common.cuh): misaligned vector loads and the load path taken per
// (thread, z step): [0] keys 16-byte chunks, [1] keys one channel at a time, [2] x column pairs, [3] x scalar.
extern "C" void featup_emu_counters(long long* out) {
    out[0] = featup_emu_misaligned;
    for (int i = 0; i < 4; ++i) out[1 + i] = featup_emu_path[i];
    featup_emu_misaligned = 0;
    for (int i = 0; i < 4; ++i) featup_emu_path[i] = 0;
}

extern "C" int featup_launch(const char* kernel, const char* ctype, const int* grid, const int* block,
                             void** ptrs, const int* ints) {
    if (!std::strcmp(ctype, "float")) return launch_t<float>(kernel, grid, block, ptrs, ints);
    if (!std::strcmp(ctype, "half_t")) return launch_t<half_t>(kernel, grid, block, ptrs, ints);
    if (!std::strcmp(ctype, "bf16_t")) return launch_t<bf16_t>(kernel, grid, block, ptrs, ints);
    return 2;
}
