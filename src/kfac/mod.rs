//! Kronecker-factored EWC (Ritter et al. 2018): per layer, the Fisher block of the weight in
//! matrix form W̃ = [W, b] (`[out, in(+1)]`) is approximated by A ⊗ G, with A = E[ã ãᵀ] over the
//! layer's input rows (a constant 1 appended when there is a bias) and G = E[g gᵀ] over the
//! log-likelihood's gradients w.r.t. the layer's output (Martens & Grosse 2015; for
//! convolutions and sequences, Grosse & Martens 2016 with every position a row of A).
//!
//! - `factors`: the sums of A and G of one estimation, fed by the Fisher driver's root loop.
//! - `penalty`: ½λ Σ tr(ΔW̃ᵀ G ΔW̃ A) and its gradient λ G ΔW̃ A, layers of one shape batched.

pub mod factors;
pub mod penalty;
