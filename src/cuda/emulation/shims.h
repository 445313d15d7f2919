// Host stand-ins for the CUDA built-ins penalty.cu uses, so that the kernel's own source runs on a
// CPU in `cargo test` (src/cuda/tests.rs): each block's 256 threads are real threads, meeting at
// barriers for __syncthreads and the warp shuffles; blocks run one after another. Test-only: the
// extension never compiles this.
#pragma once
#include <barrier>
#include <cmath>  // exp2f
#include <cstring>

#define EWC_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __grid_constant__
// Blocks run one at a time, so one static array serves as each block's shared memory.
#define __shared__ static

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};

namespace emu {
inline thread_local EmuDim3 thread_idx, block_idx;
inline EmuDim3 grid_dim, block_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barrier[32] = {};
inline double warp_values[32][32];
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Every lane of the warp calls it (as in the kernel): publish, wait, read lane + o, wait.
inline double __shfl_down_sync(unsigned, double v, int o) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    emu::warp_values[warp][lane] = v;
    emu::warp_barrier[warp]->arrive_and_wait();
    const double out = lane + o < 32 ? emu::warp_values[warp][lane + o] : v;
    emu::warp_barrier[warp]->arrive_and_wait();
    return out;
}

template <class T>
inline T __ldg(const T* p) {
    return *p;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float ewc_half_to_float(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline unsigned short ewc_float_to_half(float f) {
    const _Float16 x = (_Float16)f;  // round to nearest even, as cvt.rn.f16.f32
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}
