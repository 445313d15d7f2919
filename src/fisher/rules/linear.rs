//! `nn.Linear`: y = a Wᵀ + b, with any number of dims between the sample dim and the features.

use super::{sum_middle, Slots};
use crate::error::{Context, Result};
use tch::{Kind, Tensor};

/// 2-d input: the per-sample gradient of W is the outer product g_n a_nᵀ, so
/// Σ_n (g_n a_nᵀ)² = (g²)ᵀ (a²): one GEMM, nothing per sample is materialised.
pub fn sum_sq_2d(a: &Tensor, g: &Tensor, want: [bool; 2]) -> Result<Slots> {
    let g2 = g.square();
    let w = if want[0] {
        let a2 = a.to_kind(Kind::Float).square();
        Some(g2.f_tr().and_then(|t| t.f_matmul(&a2)).ctx("linear rule")?)
    } else {
        None
    };
    let b = want[1].then(|| g2.sum_dim_intlist(0, false, Kind::Float));
    Ok([w, b])
}

/// `[N, ..., in]`: per-sample gradient of W is Σ_t g_nt a_ntᵀ (a batched matmul).
pub fn per_sample(a: &Tensor, g: &Tensor, want: [bool; 2]) -> Result<Slots> {
    let n = a.size()[0];
    let fin = *a.size().last().unwrap_or(&1);
    let fout = *g.size().last().unwrap_or(&1);
    let a3 = a.to_kind(Kind::Float).reshape([n, -1, fin]);
    let g3 = g.reshape([n, -1, fout]);
    let w = if want[0] {
        Some(
            g3.f_transpose(1, 2)
                .and_then(|t| t.f_bmm(&a3))
                .ctx("linear rule")?,
        )
    } else {
        None
    };
    let b = want[1].then(|| sum_middle(g, 1));
    Ok([w, b])
}
