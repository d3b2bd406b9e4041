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

// ------------------------------------------------------------------------------------------------------------------
// jbu_fused_forward_vec: the same computation with wide loads, for float16/bfloat16 (the float instantiation exists
// for the host-emulation check; the CuPy backend keeps float32 on jbu_fused_forward). Every float32 sum runs in the
// same order as in jbu_fused_forward (each tap's dot product over d = 0..D-1, each output's sum over taps i-major),
// so with the same compiler contraction the results are the same bits; only the loads differ.
//   x        (B, C, H+K-1, W+K-1)   as above
//   keys     (B, H+K-1, W+K-1, D)   CHANNEL-LAST keys padded by r; D may include zero channels (the host rounds the key
//                                   dim up to a multiple of 16 / sizeof(T) so each key splits into 16-byte chunks;
//                                   zero channels add fma(0, 0, s) = s to every dot product, i.e. nothing)
//   temperature, spatial, out, C, H, W, K, ch_per_block as above
// Thread layout: thread (tx, ty) owns TWO horizontally adjacent output pixels, A = (oy, ox) and B = (oy, ox+1) with
// ox = 2 * (blockIdx.x * blockDim.x + tx) even. B is skipped when ox+1 == W (odd W).
// Memory-access pattern:
//   keys   d-chunk outer, taps inner: the V = 16 / sizeof(T) channels [d0, d0+V) of A's and B's centre keys are
//          loaded once (one 16-byte load each) and kept in registers; then for each window row i the K+1 keys at
//          columns ox .. ox+K are loaded once each (one 16-byte load per key chunk) and serve A's tap (i, jj) and
//          B's tap (i, jj-1). The partial dot products live in the weights' shared-memory slots. A warp's 16-byte
//          loads at one d0 touch 32 pixel pairs; the other chunks of the same keys are L1 hits.
//   x      one load of 2 elements (4 bytes for 16-bit types, 8 for float) at columns (ox+jj, ox+jj+1), jj even,
//          serves A's taps jj, jj+1 and B's taps jj-1, jj: K+1 columns per window row in (K+1)/2 loads for two
//          pixels, instead of 2K scalar loads; consecutive threads read consecutive words (coalesced).
// Alignment rules (checked once per launch, uniform over the grid, so no divergence):
//   keys vector path  D % V == 0 and keys 16-byte aligned (every key chunk is then 16-byte aligned); otherwise
//                     each channel is loaded alone (V = 1), same order.
//   x pair path       Wp = W+K-1 even (i.e. W even for odd K; then every row, plane and ox is even), K odd, and x
//                     aligned to 2*sizeof(T); otherwise each pixel runs window_sum_store as jbu_fused_forward does.
// Shared memory: 2 * blockDim.x * blockDim.y * K*K floats; thread t's pixel A uses slot t, pixel B slot
// (blockDim.x*blockDim.y + t), K*K contiguous floats each. Consecutive threads are K*K (odd) words apart, so a
// warp's accesses to one tap fall in distinct banks. Only the owning thread touches its slots (no __syncthreads).
// Launch: block (bx, by, 1) with bx = 32 (16 when 2*32*K*K floats exceed 48 KB, i.e. K = 15); grid
// (ceil(ceil(W/2)/bx), ceil(H/by), min(nz, 65535)), nz = B * ceil(C / ch_per_block), as for jbu_fused_forward.

// V channels of a key, as float: one 16-byte load (V = 16 / sizeof(T)) or one scalar load (V = 1).
template <typename T, int V>
__device__ __forceinline__ void load_key_chunk(const T* __restrict__ p, float* out) {
    if constexpr (V == 1) {
        out[0] = to_float(p[0]);
    } else {
        static_assert(V == featup_vec16<T>::N, "a key chunk is one 16-byte load");
        load16_as_float<T>(p, out);
    }
}

// Raw range logits (dot products, before the temperature) of pixels A and B into wa[t], wb[t], t = i*K + j.
// kb points at this batch item's channel-last keys; D is their (padded) channel count, a multiple of V.
template <typename T, int V>
__device__ __forceinline__ void jbu_pair_logits(const T* __restrict__ kb, float* wa, float* wb, bool has_b, int oy,
                                                int ox, int Wp, int D, int K) {
    const int KK = K * K;
    const int r = (K - 1) / 2;
    for (int t = 0; t < KK; ++t) wa[t] = 0.f;
    if (has_b)
        for (int t = 0; t < KK; ++t) wb[t] = 0.f;
    const long long row_stride = (long long)Wp * D;  // elements per key row
    const T* centre = kb + (long long)(oy + r) * row_stride + (long long)(ox + r) * D;  // A's; B's is D further
    const int ncols = has_b ? K + 1 : K;  // window columns ox .. ox+ncols-1 (column ox+K only serves B)
    for (int d0 = 0; d0 < D; d0 += V) {
        float ca[V], cb[V];
        load_key_chunk<T, V>(centre + d0, ca);
        if (has_b) load_key_chunk<T, V>(centre + D + d0, cb);
        for (int i = 0; i < K; ++i) {
            const T* rowp = kb + (long long)(oy + i) * row_stride + (long long)ox * D + d0;
            for (int jj = 0; jj < ncols; ++jj) {
                float nb[V];
                load_key_chunk<T, V>(rowp + (long long)jj * D, nb);
                if (jj < K) {  // A's tap (i, jj)
                    float s = wa[i * K + jj];
#pragma unroll
                    for (int v = 0; v < V; ++v) s += ca[v] * nb[v];
                    wa[i * K + jj] = s;
                }
                if (has_b && jj >= 1) {  // B's tap (i, jj-1)
                    float s = wb[i * K + jj - 1];
#pragma unroll
                    for (int v = 0; v < V; ++v) s += cb[v] * nb[v];
                    wb[i * K + jj - 1] = s;
                }
            }
        }
    }
}

// Raw dot products in w[0..KK) -> normalised JBU weights, exactly as jbu_fused_forward computes them.
__device__ __forceinline__ void jbu_normalise(float* w, int KK, float temp, const float* __restrict__ spatial) {
    float m = -3.402823466e38f;
    for (int t = 0; t < KK; ++t) {
        const float l = temp * w[t];
        w[t] = l;
        m = fmaxf(m, l);
    }
    float z_sum = 0.f;
    for (int t = 0; t < KK; ++t) {
        const float e = expf(w[t] - m);
        w[t] = e;
        z_sum += e;
    }
    const float inv_z = 1.f / z_sum;
    float s_sum = 0.f;
    for (int t = 0; t < KK; ++t) {
        const float ws = w[t] * inv_z * spatial[t];
        w[t] = ws;
        s_sum += ws;
    }
    const float inv_s = 1.f / fmaxf(s_sum, FEATUP_RENORM_EPS);
    for (int t = 0; t < KK; ++t) w[t] *= inv_s;
}

// The window sums of pixels A (weights wa) and B (weights wb, one column right) for up to FEATUP_CPT channels:
//   op[cc*out_plane + p] = sum_{i,j<K} w_p[i*K + j] * xp[cc*in_plane + i*Wp + j + p]   p = 0 (A), 1 (B)
// Each load reads the pair of columns (jj, jj+1), jj even: A's taps jj, jj+1 and B's taps jj-1, jj (K odd, so the
// last pair is (K-1, K)). Taps are added in increasing order for both pixels, as window_sum_store does, and a pair
// element outside a pixel's window is never multiplied (no 0 * x term, which would turn an inf in x into a NaN).
// Needs xp aligned to 2*sizeof(T) and Wp, in_plane even.
template <typename T>
__device__ __forceinline__ void pair_window_sum_store(const T* __restrict__ xp, const float* wa, const float* wb,
                                                      T* __restrict__ op, long long in_plane, long long out_plane,
                                                      int Wp, int K, int nc) {
    float acc_a[FEATUP_CPT], acc_b[FEATUP_CPT];
#pragma unroll
    for (int cc = 0; cc < FEATUP_CPT; ++cc) acc_a[cc] = acc_b[cc] = 0.f;
    for (int i = 0; i < K; ++i) {
        for (int jj = 0; jj < K; jj += 2) {
            const bool a1 = jj + 1 < K;  // A has a tap jj+1 (false for the last pair)
            const bool b0 = jj >= 1;     // B has a tap jj-1 (false for the first pair)
            const float wa0 = wa[i * K + jj];
            const float wa1 = a1 ? wa[i * K + jj + 1] : 0.f;
            const float wb0 = b0 ? wb[i * K + jj - 1] : 0.f;
            const float wb1 = wb[i * K + jj];
            const long long off = (long long)i * Wp + jj;
#pragma unroll
            for (int cc = 0; cc < FEATUP_CPT; ++cc) {
                if (cc < nc) {
                    float v0, v1;
                    load_pair_as_float<T>(xp + cc * in_plane + off, v0, v1);
                    acc_a[cc] += wa0 * v0;
                    if (a1) acc_a[cc] += wa1 * v1;
                    if (b0) acc_b[cc] += wb0 * v0;
                    acc_b[cc] += wb1 * v1;
                }
            }
        }
    }
#pragma unroll
    for (int cc = 0; cc < FEATUP_CPT; ++cc) {
        if (cc < nc) {
            op[cc * out_plane] = from_float<T>(acc_a[cc]);
            op[cc * out_plane + 1] = from_float<T>(acc_b[cc]);
        }
    }
}

// KC: the tap count per side fixed at compile time (the host instantiates KC = 7, FeatUp's window; see
// FUSED_VEC_FIXED_K in _sources.py), so every tap loop above sees a constant trip count and constant offsets once
// inlined; KC = 0 takes K from the argument (any odd K <= 15).
template <typename T, int KC>
__global__ void jbu_fused_forward_vec(const T* __restrict__ x, const T* __restrict__ keys,
                                      const float* __restrict__ temperature, const float* __restrict__ spatial,
                                      T* __restrict__ out, int B, int C, int D, int H, int W, int K_arg,
                                      int ch_per_block) {
    extern __shared__ float featup_smem[];
    const int K = KC > 0 ? KC : K_arg;
    const int ox = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= W || oy >= H) return;
    const bool has_b = ox + 1 < W;
    const int KK = K * K;
    const int nthreads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    float* wa = featup_smem + (long long)tid * KK;
    float* wb = featup_smem + (long long)(nthreads + tid) * KK;
    const int Hp = H + K - 1, Wp = W + K - 1;
    const long long in_plane = (long long)Hp * Wp;
    const long long out_plane = (long long)H * W;
    const float temp = temperature[0];
    constexpr int V = featup_vec16<T>::N;
    const bool keys_vec = (D % V == 0) && featup_aligned(keys, 16);
    const bool x_pairs = (Wp % 2 == 0) && (K % 2 == 1) && featup_aligned(x, 2 * (int)sizeof(T));
    const int chunks = (C + ch_per_block - 1) / ch_per_block;
    const long long nz = (long long)B * chunks;
    for (long long z = blockIdx.z; z < nz; z += gridDim.z) {
        const int b = (int)(z / chunks);
        const int cstart = (int)(z % chunks) * ch_per_block;
        const int cend = min(C, cstart + ch_per_block);
        const T* kb = keys + (long long)b * in_plane * D;
        if (keys_vec) {
            FEATUP_EMU_PATH(0);
            jbu_pair_logits<T, V>(kb, wa, wb, has_b, oy, ox, Wp, D, K);
        } else {
            FEATUP_EMU_PATH(1);
            jbu_pair_logits<T, 1>(kb, wa, wb, has_b, oy, ox, Wp, D, K);
        }
        jbu_normalise(wa, KK, temp, spatial);
        if (has_b) jbu_normalise(wb, KK, temp, spatial);
        if (x_pairs) FEATUP_EMU_PATH(2); else FEATUP_EMU_PATH(3);
        for (int c0 = cstart; c0 < cend; c0 += FEATUP_CPT) {
            const int nc = min(FEATUP_CPT, cend - c0);
            const T* xp = x + ((long long)b * C + c0) * in_plane + (long long)oy * Wp + ox;
            T* op = out + ((long long)b * C + c0) * out_plane + (long long)oy * W + ox;
            if (x_pairs) {
                pair_window_sum_store(xp, wa, wb, op, in_plane, out_plane, Wp, K, nc);  // has_b holds: W even
            } else {
                window_sum_store(xp, wa, op, in_plane, out_plane, Wp, K, nc);
                if (has_b) window_sum_store(xp + 1, wb, op + 1, in_plane, out_plane, Wp, K, nc);
            }
        }
    }
}
