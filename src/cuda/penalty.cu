// The one-pass EWC penalty on CUDA. Compiled at run time by NVRTC (src/cuda/nvrtc.rs), so the
// build needs no CUDA toolkit; EWC_MAX_ITEMS comes as a -D option (it sizes the launch table,
// which travels as the kernel's parameter: no host-to-device copy, no synchronisation).
//
// Per element: d = θ − θ*, gradient c·F·d (written, or added to what the target holds), and
// F·d² summed. F is a flat buffer of θ*'s dtype, or 8-bit codes decoded in the loop (the `_q8`
// kernels; the code is src/fisher8.rs's: q = 0 is zero, q ≥ 1 is 2^(lo + (q−1)·step) with the
// float32 pair (lo, step) of the value's block of 2^block_log2 values of its tensor). Sums run
// in float within a tile, in double across tiles and threads; one double per block
// goes to `partials`, and `ewc_penalty_finish` sums those in a fixed order (deterministic).
// Layout of Item and Table: keep in step with src/cuda/table.rs (checked below and there).
// `cargo test` also runs this source on the CPU (src/cuda/emulation/: EWC_HOST_EMULATION).

typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;

#define EWC_BLOCK 256
#define EWC_PER_THREAD 8
#define EWC_TILE (EWC_BLOCK * EWC_PER_THREAD)

struct Item {
    u64 param;            // θ, in the parameters' dtype
    u64 grad;             // gradient target, same dtype
    u64 offset;           // index of the first element in the flat θ* and F buffers
    u64 len;              // elements
    u64 block;            // 8-bit F: index of this tensor's first scale block (else 0)
    unsigned first_tile;  // this item's first tile among the launch's tiles
    unsigned add;         // 1: add the gradient to the target; 0: overwrite it
};

struct Table {
    u64 star;      // flat θ*
    u64 fisher;    // flat F, or F's 8-bit codes
    u64 partials;  // double per block of this launch
    u64 scales;    // 8-bit F: float32 (lo, step) per scale block (else 0)
    float coef;    // λ × the gradient's scale
    unsigned count;
    unsigned tiles;
    unsigned block_log2;  // 8-bit F: log₂ of the scale block's values
    Item items[EWC_MAX_ITEMS];
};

static_assert(sizeof(Item) == 48, "Item layout: see src/cuda/table.rs");
static_assert(sizeof(Table) == 48 + 48 * EWC_MAX_ITEMS, "Table layout: see src/cuda/table.rs");

// Element types: load as float, store from float (round to nearest even).
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(const T* p) { return __ldg(p); }
    static __device__ __forceinline__ float get(T v) { return v; }
    static __device__ __forceinline__ T put(float x) { return x; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float get(T v) {
#ifdef EWC_HOST_EMULATION
        return ewc_half_to_float(v);
#else
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
#endif
    }
    static __device__ __forceinline__ float load(const T* p) { return get(__ldg(p)); }
    static __device__ __forceinline__ T put(float x) {
#ifdef EWC_HOST_EMULATION
        return ewc_float_to_half(x);
#else
        T h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
        return h;
#endif
    }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float get(T v) { return __uint_as_float(((unsigned)v) << 16); }
    static __device__ __forceinline__ float load(const T* p) { return get(__ldg(p)); }
    static __device__ __forceinline__ T put(float x) {
        unsigned u = __float_as_uint(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);  // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return (T)(u >> 16);
    }
};

// F's value at element j of item `it`: dense (S's dtype) or 8-bit coded.
template <class S, bool Q8>
__device__ __forceinline__ float fisher_at(const Table& t, const Item& it, u64 j) {
    if (!Q8) return S::load((const typename S::T*)t.fisher + it.offset + j);
    const unsigned q = __ldg((const u8*)t.fisher + it.offset + j);
    const float* sc = (const float*)t.scales + 2 * (it.block + (j >> t.block_log2));
    const float f = exp2f(__ldg(sc) + (float)((int)q - 1) * __ldg(sc + 1));
    return q == 0 ? 0.0f : f;
}

// The sum over the block, valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
    __shared__ double warp_sums[EWC_BLOCK / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    v = threadIdx.x < EWC_BLOCK / 32 ? warp_sums[threadIdx.x] : 0.0;
    if (threadIdx.x < 32) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    return v;
}

// The last item whose first tile is at most `tile`, searched in [lo, count): tiles rise within a
// block, so the previous answer bounds the next.
__device__ __forceinline__ unsigned find_item(const Table& t, unsigned tile, unsigned lo) {
    unsigned hi = t.count - 1;
    while (lo < hi) {
        unsigned mid = (lo + hi + 1) >> 1;
        if (t.items[mid].first_tile <= tile) lo = mid; else hi = mid - 1;
    }
    return lo;
}

template <class P, class S, bool Q8>
__device__ __forceinline__ void penalty_pass(const Table& t) {
    const typename S::T* star = (const typename S::T*)t.star;
    double acc = 0.0;
    unsigned at = 0;
    for (unsigned tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
        at = find_item(t, tile, at);
        const Item& it = t.items[at];
        const u64 start = (u64)(tile - it.first_tile) * EWC_TILE + threadIdx.x;
        const typename P::T* theta = (const typename P::T*)it.param;
        typename P::T* grad = (typename P::T*)it.grad;
        const typename S::T* s = star + it.offset;
        // All loads first (independent, in flight together), then the arithmetic and stores.
        float th[EWC_PER_THREAD], st[EWC_PER_THREAD], fi[EWC_PER_THREAD], old[EWC_PER_THREAD];
#pragma unroll
        for (int k = 0; k < EWC_PER_THREAD; ++k) {
            const u64 j = start + (u64)k * EWC_BLOCK;
            const bool in = j < it.len;
            th[k] = in ? P::load(theta + j) : 0.0f;
            st[k] = in ? S::load(s + j) : 0.0f;
            fi[k] = in ? fisher_at<S, Q8>(t, it, j) : 0.0f;
            old[k] = in && it.add ? P::get(grad[j]) : 0.0f;
        }
        float part = 0.0f;
#pragma unroll
        for (int k = 0; k < EWC_PER_THREAD; ++k) {
            const u64 j = start + (u64)k * EWC_BLOCK;
            const float d = th[k] - st[k];
            const float fd = fi[k] * d;
            part += fd * d;
            if (j < it.len) grad[j] = P::put(old[k] + t.coef * fd);
        }
        acc += (double)part;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) ((double*)t.partials)[blockIdx.x] = acc;
}

#define EWC_PENALTY_KERNEL(name, P, S, Q8)                                                \
    extern "C" __global__ void __launch_bounds__(EWC_BLOCK) name(const __grid_constant__ Table t) { \
        penalty_pass<P, S, Q8>(t);                                                        \
    }

EWC_PENALTY_KERNEL(ewc_penalty_f32_f32, F32, F32, false)
EWC_PENALTY_KERNEL(ewc_penalty_f16_f32, F16, F32, false)
EWC_PENALTY_KERNEL(ewc_penalty_bf16_f32, BF16, F32, false)
EWC_PENALTY_KERNEL(ewc_penalty_f32_bf16, F32, BF16, false)
EWC_PENALTY_KERNEL(ewc_penalty_f16_bf16, F16, BF16, false)
EWC_PENALTY_KERNEL(ewc_penalty_bf16_bf16, BF16, BF16, false)
EWC_PENALTY_KERNEL(ewc_penalty_f32_f32_q8, F32, F32, true)
EWC_PENALTY_KERNEL(ewc_penalty_f16_f32_q8, F16, F32, true)
EWC_PENALTY_KERNEL(ewc_penalty_bf16_f32_q8, BF16, F32, true)
EWC_PENALTY_KERNEL(ewc_penalty_f32_bf16_q8, F32, BF16, true)
EWC_PENALTY_KERNEL(ewc_penalty_f16_bf16_q8, F16, BF16, true)
EWC_PENALTY_KERNEL(ewc_penalty_bf16_bf16_q8, BF16, BF16, true)

// value[0] = scale × Σ partials, summed in the same order every time. One block.
extern "C" __global__ void __launch_bounds__(EWC_BLOCK)
ewc_penalty_finish(const double* partials, unsigned n, double scale, float* value) {
    double acc = 0.0;
    for (unsigned i = threadIdx.x; i < n; i += EWC_BLOCK) acc += partials[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) value[0] = (float)(scale * acc);
}
