// Fused JBU forward (inference): per output pixel, compute the range kernel from the keys, the softmax over the
// K*K taps, the spatial kernel and the renormalisation, then the weighted sum over the channels, in one kernel.
//   x        (B, C, H+K-1, W+K-1)   features padded by r = (K-1)/2
//   keys     (B, D, H+K-1, W+K-1)   keys padded by r, same dtype as x
//   temperature  float32 scalar on the device (multiplies the logits)
//   spatial  (K, K) float32 on the device
//   out      (B, C, H, W)
// w[t] = s[t] * softmax_t(temp * <k[y+r,x+r], k[y+i,x+j]>) / max(sum_t(...), 1e-7), t = i*K + j.
// Each thread's K*K weights live in dynamic shared memory (blockDim.x * blockDim.y * K*K floats, <= 48 KB, chosen
// by the host); only the owning thread reads them, so no __syncthreads is needed.
// Launch: block (32, by, 1); grid (ceil(W/32), ceil(H/by), min(nz, 65535)), nz = B * ceil(C / ch_per_block); each
// z step recomputes the weights for its (b, channel chunk) and sums ch_per_block channels.
#include "featup_common.cuh"

#define FEATUP_RENORM_EPS 1e-7f

template <typename T>
__global__ void jbu_fused_forward(const T* __restrict__ x, const T* __restrict__ keys,
                                  const float* __restrict__ temperature, const float* __restrict__ spatial,
                                  T* __restrict__ out, int B, int C, int D, int H, int W, int K, int ch_per_block) {
    extern __shared__ float featup_smem[];
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= W || oy >= H) return;
    const int KK = K * K;
    const int r = (K - 1) / 2;
    float* wsh = featup_smem + (threadIdx.y * blockDim.x + threadIdx.x) * KK;
    const int Hp = H + K - 1, Wp = W + K - 1;
    const long long in_plane = (long long)Hp * Wp;
    const long long out_plane = (long long)H * W;
    const float temp = temperature[0];
    const int chunks = (C + ch_per_block - 1) / ch_per_block;
    const long long nz = (long long)B * chunks;
    for (long long z = blockIdx.z; z < nz; z += gridDim.z) {
        const int b = (int)(z / chunks);
        const int cstart = (int)(z % chunks) * ch_per_block;
        const int cend = min(C, cstart + ch_per_block);
        // range logits
        const T* kb = keys + (long long)b * D * in_plane;
        const long long center = (long long)(oy + r) * Wp + (ox + r);
        float m = -3.402823466e38f;
        for (int i = 0; i < K; ++i) {
            for (int j = 0; j < K; ++j) {
                const long long nb = (long long)(oy + i) * Wp + (ox + j);
                float dot = 0.f;
                for (int d = 0; d < D; ++d) {
                    const T* kd = kb + d * in_plane;
                    dot += to_float(kd[center]) * to_float(kd[nb]);
                }
                const float l = temp * dot;
                wsh[i * K + j] = l;
                m = fmaxf(m, l);
            }
        }
        // softmax over taps, times the spatial kernel, renormalised (sum clamped like the torch reference)
        float z_sum = 0.f;
        for (int t = 0; t < KK; ++t) {
            const float e = expf(wsh[t] - m);
            wsh[t] = e;
            z_sum += e;
        }
        const float inv_z = 1.f / z_sum;
        float s_sum = 0.f;
        for (int t = 0; t < KK; ++t) {
            const float ws = wsh[t] * inv_z * spatial[t];
            wsh[t] = ws;
            s_sum += ws;
        }
        const float inv_s = 1.f / fmaxf(s_sum, FEATUP_RENORM_EPS);
        for (int t = 0; t < KK; ++t) wsh[t] *= inv_s;
        // weighted sum, FEATUP_CPT channels at a time
        for (int c0 = cstart; c0 < cend; c0 += FEATUP_CPT) {
            const int nc = min(FEATUP_CPT, cend - c0);
            const T* xp = x + ((long long)b * C + c0) * in_plane + (long long)oy * Wp + ox;
            T* op = out + ((long long)b * C + c0) * out_plane + (long long)oy * W + ox;
            window_sum_store(xp, wsh, op, in_plane, out_plane, Wp, K, nc);
        }
    }
}
