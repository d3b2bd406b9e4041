// CPU adaptive convolution, float32, built on first use by kernels/_cpu_compiled.py (g++ -O3, no torch headers,
// a few seconds) and called through ctypes. Each call is ONE parallel region (std::thread), so the op does not pay
// a thread-pool barrier per tap as the 49-op torch loop does; the inner loops are contiguous rows that the
// compiler vectorises.
//   x  (B, C, H+K-1, W+K-1)   w taps-first (B, K, K, H, W)   out / grad_out (B, C, H, W)
//   out[b,c,y,x]      = sum_ij w[b,i,j,y,x] * x[b,c,y+i,x+j]
//   grad_x[b,c,y+i,x+j] += grad_out[b,c,y,x] * w[b,i,j,y,x]
//   grad_w[b,i,j,y,x] = sum_c grad_out[b,c,y,x] * x[b,c,y+i,x+j]
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

template <typename F>
void parallel_for(int64_t n, int threads, F body) {
    threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n));
    if (threads == 1) {
        body(0, n);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t step = (n + threads - 1) / threads;
    for (int t = 1; t < threads; ++t) {
        const int64_t lo = t * step, hi = std::min(n, lo + step);
        if (lo < hi) pool.emplace_back([=] { body(lo, hi); });
    }
    body(0, std::min(n, step));
    for (auto& th : pool) th.join();
}

inline void axpy_mul(float* __restrict__ dst, const float* __restrict__ a, const float* __restrict__ b, int n) {
    for (int k = 0; k < n; ++k) dst[k] += a[k] * b[k];
}

}  // namespace

extern "C" {

// parallel over (b, y): the K*K weight rows of one output row stay in L1/L2 while all channels stream past
void featup_cpu_forward(const float* x, const float* w, float* out, int B, int C, int H, int W, int K, int threads) {
    const int Hp = H + K - 1, Wp = W + K - 1;
    const int64_t in_plane = (int64_t)Hp * Wp, out_plane = (int64_t)H * W, tap_plane = (int64_t)H * W;
    parallel_for((int64_t)B * H, threads, [&](int64_t lo, int64_t hi) {
        for (int64_t by = lo; by < hi; ++by) {
            const int b = (int)(by / H), y = (int)(by % H);
            const float* wb = w + (int64_t)b * K * K * tap_plane + (int64_t)y * W;
            for (int c = 0; c < C; ++c) {
                float* orow = out + ((int64_t)b * C + c) * out_plane + (int64_t)y * W;
                const float* xc = x + ((int64_t)b * C + c) * in_plane;
                std::memset(orow, 0, sizeof(float) * W);
                for (int i = 0; i < K; ++i) {
                    const float* xrow = xc + (int64_t)(y + i) * Wp;
                    for (int j = 0; j < K; ++j) axpy_mul(orow, wb + (int64_t)(i * K + j) * tap_plane, xrow + j, W);
                }
            }
        }
    });
}

// parallel over (b, c): each thread owns whole grad_x planes (the taps of neighbouring rows overlap)
void featup_cpu_grad_input(const float* g, const float* w, float* gx, int B, int C, int H, int W, int K, int threads) {
    const int Hp = H + K - 1, Wp = W + K - 1;
    const int64_t in_plane = (int64_t)Hp * Wp, out_plane = (int64_t)H * W, tap_plane = (int64_t)H * W;
    parallel_for((int64_t)B * C, threads, [&](int64_t lo, int64_t hi) {
        for (int64_t bc = lo; bc < hi; ++bc) {
            const int b = (int)(bc / C);
            float* gxc = gx + bc * in_plane;
            std::memset(gxc, 0, sizeof(float) * in_plane);
            const float* gc = g + bc * out_plane;
            const float* wb = w + (int64_t)b * K * K * tap_plane;
            for (int y = 0; y < H; ++y) {
                const float* grow = gc + (int64_t)y * W;
                for (int i = 0; i < K; ++i) {
                    float* gxrow = gxc + (int64_t)(y + i) * Wp;
                    for (int j = 0; j < K; ++j)
                        axpy_mul(gxrow + j, grow, wb + (int64_t)(i * K + j) * tap_plane + (int64_t)y * W, W);
                }
            }
        }
    });
}

// parallel over (b, y): one thread accumulates the K*K rows of grad_w for an output row over all channels
void featup_cpu_grad_filter(const float* g, const float* x, float* gw, int B, int C, int H, int W, int K, int threads) {
    const int Hp = H + K - 1, Wp = W + K - 1;
    const int64_t in_plane = (int64_t)Hp * Wp, out_plane = (int64_t)H * W, tap_plane = (int64_t)H * W;
    parallel_for((int64_t)B * H, threads, [&](int64_t lo, int64_t hi) {
        std::vector<float> acc((size_t)K * K * W);
        for (int64_t by = lo; by < hi; ++by) {
            const int b = (int)(by / H), y = (int)(by % H);
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int c = 0; c < C; ++c) {
                const float* grow = g + ((int64_t)b * C + c) * out_plane + (int64_t)y * W;
                const float* xc = x + ((int64_t)b * C + c) * in_plane;
                for (int i = 0; i < K; ++i) {
                    const float* xrow = xc + (int64_t)(y + i) * Wp;
                    for (int j = 0; j < K; ++j) axpy_mul(acc.data() + (size_t)(i * K + j) * W, grow, xrow + j, W);
                }
            }
            float* gwb = gw + (int64_t)b * K * K * tap_plane + (int64_t)y * W;
            for (int t = 0; t < K * K; ++t)
                std::memcpy(gwb + (int64_t)t * tap_plane, acc.data() + (size_t)t * W, sizeof(float) * W);
        }
    });
}

}  // extern "C"
