// Runs penalty.cu's kernels on the CPU (see shims.h): built by src/cuda/tests.rs into a shared
// library and called through these two functions with host pointers in the launch table.
#include <functional>
#include <thread>
#include <vector>

#include "shims.h"
#include "../penalty.cu"

namespace {
// One launch: `grid` blocks in turn, each with EWC_BLOCK threads running `body`.
void run_grid(unsigned grid, const std::function<void()>& body) {
    emu::grid_dim = {grid, 1, 1};
    emu::block_dim = {EWC_BLOCK, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> block(EWC_BLOCK);
        std::vector<std::barrier<>*> warps;
        for (int w = 0; w < EWC_BLOCK / 32; ++w) warps.push_back(new std::barrier<>(32));
        emu::block_barrier = &block;
        for (int w = 0; w < EWC_BLOCK / 32; ++w) emu::warp_barrier[w] = warps[w];
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < EWC_BLOCK; ++t) {
            threads.emplace_back([&, t] {
                emu::thread_idx = {t, 0, 0};
                emu::block_idx = {b, 0, 0};
                body();
            });
        }
        for (auto& th : threads) th.join();
        for (auto* w : warps) delete w;
    }
}
}  // namespace

extern "C" int ewc_emulate_penalty(int variant, const void* table, unsigned grid) {
    void (*kernels[12])(const Table) = {
        ewc_penalty_f32_f32,    ewc_penalty_f16_f32,    ewc_penalty_bf16_f32,    ewc_penalty_f32_bf16,
        ewc_penalty_f16_bf16,   ewc_penalty_bf16_bf16,  ewc_penalty_f32_f32_q8,  ewc_penalty_f16_f32_q8,
        ewc_penalty_bf16_f32_q8, ewc_penalty_f32_bf16_q8, ewc_penalty_f16_bf16_q8, ewc_penalty_bf16_bf16_q8};
    if (variant < 0 || variant >= 12) return 1;
    const Table& t = *static_cast<const Table*>(table);
    run_grid(grid, [&] { kernels[variant](t); });
    return 0;
}

extern "C" void ewc_emulate_finish(const double* partials, unsigned n, double scale, float* value) {
    run_grid(1, [&] { ewc_penalty_finish(partials, n, scale, value); });
}
