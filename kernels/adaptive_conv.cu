// JBU adaptive convolution: out[b,c,y,x] = sum_{i,j<K} w[b,y,x,i,j] * x[b,c,y+i,x+j]
//   x   (B, C, H+K-1, W+K-1)  contiguous, already padded
//   w   (B, H, W, K, K)       contiguous, one K*K kernel per output pixel, shared by all channels
//   out (B, C, H, W)
// T is float, half_t or bf16_t; every sum accumulates in float32. Offsets are 64-bit (B*C*H*W may exceed 2^31).
// Launch (all three): block (32, 8, 1); grid (ceil(cols/32), ceil(rows/8), min(nz, 65535)) where the z index is
// walked with a grid-stride loop, so any B*C fits.
#include "featup_common.cuh"

// grid z enumerates (b, channel group of FEATUP_CPT channels): nz = B * ceil(C / FEATUP_CPT)
template <typename T>
__global__ void adaptive_conv_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                                      int B, int C, int H, int W, int K) {
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= W || oy >= H) return;
    const int Hp = H + K - 1, Wp = W + K - 1;
    const long long in_plane = (long long)Hp * Wp;
    const long long out_plane = (long long)H * W;
    const int groups = (C + FEATUP_CPT - 1) / FEATUP_CPT;
    const long long nz = (long long)B * groups;
    for (long long z = blockIdx.z; z < nz; z += gridDim.z) {
        const int b = (int)(z / groups);
        const int c0 = (int)(z % groups) * FEATUP_CPT;
        const int nc = min(FEATUP_CPT, C - c0);
        const T* wp = w + (((long long)b * H + oy) * W + ox) * K * K;
        const T* xp = x + ((long long)b * C + c0) * in_plane + (long long)oy * Wp + ox;
        T* op = out + ((long long)b * C + c0) * out_plane + (long long)oy * W + ox;
        window_sum_store(xp, wp, op, in_plane, out_plane, Wp, K, nc);
    }
}

// grad_x[b,c,yy,xx] = sum_{i,j} gO[b,c,yy-i,xx-j] * w[b,yy-i,xx-j,i,j] over taps with 0<=yy-i<H, 0<=xx-j<W.
// A gather (one thread per input pixel and channel group): no atomics, deterministic.
// Thread grid covers the padded input (H+K-1, W+K-1); nz = B * ceil(C / FEATUP_CPT).
template <typename T>
__global__ void adaptive_conv_grad_input(const T* __restrict__ grad_out, const T* __restrict__ w,
                                         T* __restrict__ grad_x, int B, int C, int H, int W, int K) {
    const int xx = blockIdx.x * blockDim.x + threadIdx.x;
    const int yy = blockIdx.y * blockDim.y + threadIdx.y;
    const int Hp = H + K - 1, Wp = W + K - 1;
    if (xx >= Wp || yy >= Hp) return;
    const long long in_plane = (long long)Hp * Wp;
    const long long out_plane = (long long)H * W;
    const int groups = (C + FEATUP_CPT - 1) / FEATUP_CPT;
    const long long nz = (long long)B * groups;
    const int i_lo = max(0, yy - H + 1), i_hi = min(K - 1, yy);
    const int j_lo = max(0, xx - W + 1), j_hi = min(K - 1, xx);
    for (long long z = blockIdx.z; z < nz; z += gridDim.z) {
        const int b = (int)(z / groups);
        const int c0 = (int)(z % groups) * FEATUP_CPT;
        const int nc = min(FEATUP_CPT, C - c0);
        const T* gp = grad_out + ((long long)b * C + c0) * out_plane;
        float acc[FEATUP_CPT];
#pragma unroll
        for (int cc = 0; cc < FEATUP_CPT; ++cc) acc[cc] = 0.f;
        for (int i = i_lo; i <= i_hi; ++i) {
            const int y = yy - i;
            for (int j = j_lo; j <= j_hi; ++j) {
                const int x = xx - j;
                const float wv = to_float(w[(((long long)b * H + y) * W + x) * K * K + i * K + j]);
                const long long off = (long long)y * W + x;
#pragma unroll
                for (int cc = 0; cc < FEATUP_CPT; ++cc)
                    if (cc < nc) acc[cc] += wv * to_float(gp[cc * out_plane + off]);
            }
        }
        T* dst = grad_x + ((long long)b * C + c0) * in_plane + (long long)yy * Wp + xx;
#pragma unroll
        for (int cc = 0; cc < FEATUP_CPT; ++cc)
            if (cc < nc) dst[cc * in_plane] = from_float<T>(acc[cc]);
    }
}

// grad_w[b,y,x,i,j] = sum_c gO[b,c,y,x] * x[b,c,y+i,x+j]
// One thread per output pixel and tap row i; it keeps K accumulators (one per tap column j) and loops over all
// channels, so gO is read once per tap row. grid z enumerates (b, i): nz = B * K. Every (i, j) tap is written:
// the tap index is i * K + j with i taken from the z index (FeatUp's kernel used blockIdx.z*blockIdx.z here).
template <typename T>
__global__ void adaptive_conv_grad_filter(const T* __restrict__ grad_out, const T* __restrict__ x,
                                          T* __restrict__ grad_w, int B, int C, int H, int W, int K) {
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= W || oy >= H) return;
    const int Hp = H + K - 1, Wp = W + K - 1;
    const long long in_plane = (long long)Hp * Wp;
    const long long out_plane = (long long)H * W;
    const long long nz = (long long)B * K;
    for (long long z = blockIdx.z; z < nz; z += gridDim.z) {
        const int b = (int)(z / K);
        const int i = (int)(z % K);
        float acc[FEATUP_MAX_K];
#pragma unroll
        for (int j = 0; j < FEATUP_MAX_K; ++j) acc[j] = 0.f;
        const T* gp = grad_out + (long long)b * C * out_plane + (long long)oy * W + ox;
        const T* xp = x + (long long)b * C * in_plane + (long long)(oy + i) * Wp + ox;
        for (int c = 0; c < C; ++c) {
            const float g = to_float(gp[c * out_plane]);
            const T* xr = xp + c * in_plane;
#pragma unroll
            for (int j = 0; j < FEATUP_MAX_K; ++j)
                if (j < K) acc[j] += g * to_float(xr[j]);
        }
        T* dst = grad_w + (((long long)b * H + oy) * W + ox) * K * K + i * K;
#pragma unroll
        for (int j = 0; j < FEATUP_MAX_K; ++j)
            if (j < K) dst[j] = from_float<T>(acc[j]);
    }
}
