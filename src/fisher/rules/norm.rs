//! Normalisation layers: y = x̂ ⊙ γ + β, so the per-sample gradients are Σ g ⊙ x̂ (γ) and Σ g (β)
//! over every position of the sample that shares the parameter.

use super::{sum_middle, Slots};
use crate::error::Result;
use tch::{Kind, Tensor};

/// Sums `[N, C, *spatial]` over the spatial dims → `[N, C]`.
fn sum_spatial(t: &Tensor) -> Tensor {
    if t.dim() <= 2 {
        return t.shallow_clone();
    }
    let dims: Vec<i64> = (2..t.dim() as i64).collect();
    t.sum_dim_intlist(dims.as_slice(), false, Kind::Float)
}

/// Reshapes a per-channel vector `[C]` so it broadcasts against `[N, C, *spatial]`.
fn channel_view(v: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![1, -1];
    shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(2)));
    v.to_kind(Kind::Float).reshape(shape.as_slice())
}

fn affine(g: &Tensor, xhat: &Tensor, want: [bool; 2], reduce: impl Fn(&Tensor) -> Tensor) -> Slots {
    let w = want[0].then(|| reduce(&(g * xhat)));
    let b = want[1].then(|| reduce(g));
    [w, b]
}

/// BatchNorm in eval mode: x̂ = (x − running_mean) / sqrt(running_var + eps).
pub fn batch_norm(
    a: &Tensor,
    g: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    want: [bool; 2],
) -> Result<Slots> {
    let a = a.to_kind(Kind::Float);
    let xhat = (a - channel_view(mean, g)) * (channel_view(var, g) + eps).rsqrt();
    Ok(affine(g, &xhat, want, sum_spatial))
}

/// LayerNorm over the last `ndim` dims (biased variance, as PyTorch).
pub fn layer_norm(a: &Tensor, g: &Tensor, ndim: usize, eps: f64, want: [bool; 2]) -> Result<Slots> {
    let a = a.to_kind(Kind::Float);
    let d = a.dim() as i64;
    let dims: Vec<i64> = ((d - ndim as i64)..d).collect();
    let mean = a.mean_dim(dims.as_slice(), true, Kind::Float);
    let var = a.var_dim(dims.as_slice(), false, true);
    let xhat = (&a - mean) * (var + eps).rsqrt();
    Ok(affine(g, &xhat, want, |t| sum_middle(t, ndim)))
}

/// GroupNorm: statistics per (sample, group) over the group's channels and all positions.
pub fn group_norm(a: &Tensor, g: &Tensor, groups: i64, eps: f64, want: [bool; 2]) -> Result<Slots> {
    let a = a.to_kind(Kind::Float);
    let shape = a.size();
    let n = shape[0];
    let grouped = a.reshape([n, groups, -1]);
    let mean = grouped.mean_dim(2, true, Kind::Float);
    let var = grouped.var_dim(2, false, true);
    let xhat = ((grouped - mean) * (var + eps).rsqrt()).reshape(shape.as_slice());
    Ok(affine(g, &xhat, want, sum_spatial))
}
