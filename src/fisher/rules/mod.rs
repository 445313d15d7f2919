//! Per-layer rules: from a layer's input `a` and the gradient `g` of a per-sample-separable
//! scalar w.r.t. the layer's output, compute each parameter's per-sample gradients, or directly
//! the sum over samples of their squares (the Fisher's numerator) when that is cheaper.
//!
//! One small rule per layer type, looked up by the `Rule` variant (the registry lives on the
//! Python side, keyed by module type, and names the variant). Every rule works in float32.

mod conv;
mod embedding;
mod linear;
mod norm;

use crate::error::Result;
use tch::{Kind, Tensor};

/// The layer types with a vectorised rule, with the configuration each rule needs.
#[derive(Debug)]
pub enum Rule {
    /// `nn.Linear`: input `[N, ..., in]`, output `[N, ..., out]`.
    Linear,
    /// `nn.Conv1d` / `nn.Conv2d` with zero padding (1-d is handled as 2-d with height 1).
    Conv(conv::ConvGeometry),
    /// `nn.BatchNorm1d/2d` in eval mode: normalised with the running statistics.
    BatchNorm { mean: Tensor, var: Tensor, eps: f64 },
    /// `nn.LayerNorm` over the last `ndim` dimensions.
    LayerNorm { ndim: usize, eps: f64 },
    /// `nn.GroupNorm` with `groups` groups.
    GroupNorm { groups: i64, eps: f64 },
    /// `nn.Embedding`: input is a tensor of indices `[N, ...]`.
    Embedding {
        num_embeddings: i64,
        padding_idx: Option<i64>,
    },
}

pub use conv::ConvGeometry;

/// Per-parameter results of a rule: index 0 is the weight, index 1 the bias.
pub type Slots = [Option<Tensor>; 2];

impl Rule {
    /// Per-sample gradients `[n, *param_shape]` for the requested slots.
    pub fn per_sample(&self, a: &Tensor, g: &Tensor, want: [bool; 2]) -> Result<Slots> {
        let g = g.to_kind(Kind::Float);
        match self {
            Rule::Linear => linear::per_sample(a, &g, want),
            Rule::Conv(geo) => conv::per_sample(geo, a, &g, want),
            Rule::BatchNorm { mean, var, eps } => norm::batch_norm(a, &g, mean, var, *eps, want),
            Rule::LayerNorm { ndim, eps } => norm::layer_norm(a, &g, *ndim, *eps, want),
            Rule::GroupNorm { groups, eps } => norm::group_norm(a, &g, *groups, *eps, want),
            Rule::Embedding {
                num_embeddings,
                padding_idx,
            } => embedding::per_sample(a, &g, *num_embeddings, *padding_idx, want),
        }
    }

    /// Σ_n (per-sample gradient)² for the requested slots, chunked over samples so that the
    /// per-sample tensors never exceed `budget_bytes`.
    pub fn sum_sq(&self, a: &Tensor, g: &Tensor, want: [bool; 2], budget: i64) -> Result<Slots> {
        let g32 = g.to_kind(Kind::Float);
        match self {
            Rule::Linear if a.dim() == 2 => return linear::sum_sq_2d(a, &g32, want),
            Rule::Embedding {
                num_embeddings,
                padding_idx,
            } => return embedding::sum_sq(a, &g32, *num_embeddings, *padding_idx),
            _ => {}
        }
        let n = a.size()[0];
        let chunk = self.chunk_size(a, g, budget);
        let mut out: Slots = [None, None];
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let ps = self.per_sample(&a.narrow(0, start, len), &g.narrow(0, start, len), want)?;
            for (slot, t) in ps.into_iter().enumerate() {
                if let Some(t) = t {
                    let s = t.square().sum_dim_intlist(0, false, Kind::Float);
                    out[slot] = Some(match out[slot].take() {
                        Some(acc) => acc + s,
                        None => s,
                    });
                }
            }
            start += len;
        }
        Ok(out)
    }

    /// How many samples fit in `budget` bytes of per-sample intermediates.
    pub fn chunk_size(&self, a: &Tensor, g: &Tensor, budget: i64) -> i64 {
        let n = a.size()[0].max(1);
        let per_sample_elems = match self {
            Rule::Conv(geo) => geo.per_sample_elems(a, g),
            Rule::Embedding { num_embeddings, .. } => {
                num_embeddings * g.size().last().copied().unwrap_or(1)
            }
            Rule::Linear => {
                let gs = g.size();
                let aw = a.size().last().copied().unwrap_or(1);
                let gw = gs.last().copied().unwrap_or(1);
                aw * gw + (a.numel() as i64 + g.numel() as i64) / n
            }
            _ => 4 * (a.numel() as i64 + g.numel() as i64) / n,
        };
        (budget / (4 * per_sample_elems.max(1))).clamp(1, n)
    }
}

/// Sums `t` over every dimension except the first (the sample dimension) and those in `keep`
/// counted from the end, e.g. `[N, ..., C]` → `[N, C]` with `keep = 1`.
pub(crate) fn sum_middle(t: &Tensor, keep_last: usize) -> Tensor {
    let d = t.dim();
    if d <= 1 + keep_last {
        return t.shallow_clone();
    }
    let dims: Vec<i64> = (1..(d - keep_last) as i64).collect();
    t.sum_dim_intlist(dims.as_slice(), false, Kind::Float)
}

#[cfg(test)]
mod tests;
