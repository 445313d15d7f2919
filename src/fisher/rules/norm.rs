//! Normalisation layers: y = x̂ ⊙ γ + β, so the per-sample gradients are Σ g ⊙ x̂ (γ) and Σ g (β)
//! over every position of the sample that shares the parameter.

use super::{sum_middle, Rule, Slots, Want};
use crate::error::Result;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::sync::{Arc, Mutex, PoisonError};
use tch::{Kind, Tensor};

/// `nn.BatchNorm1d/2d` in eval mode: x̂ = (x − running_mean) / sqrt(running_var + eps).
#[derive(Debug)]
pub struct BatchNorm {
    /// The running mean and variance (the module's own buffers, shared; a `Mutex` because a
    /// rule is shared between threads and `tch::Tensor` is not `Sync`).
    stats: Mutex<(Tensor, Tensor)>,
    eps: f64,
}

impl BatchNorm {
    pub fn new(mean: Tensor, var: Tensor, eps: f64) -> Self {
        Self {
            stats: Mutex::new((mean, var)),
            eps,
        }
    }
}

/// `nn.LayerNorm` over the last `ndim` dimensions (biased variance, as PyTorch).
#[derive(Debug)]
pub struct LayerNorm {
    pub ndim: usize,
    pub eps: f64,
}

/// RMS normalisation over the last `ndim` dimensions: x̂ = x / sqrt(mean(x²) + eps), y = γ ⊙ x̂
/// (`nn.RMSNorm`, and the RMSNorm of Hugging Face Llama, Mistral and Qwen models, which compute
/// x̂ in float32). `eps: None` is `nn.RMSNorm`'s default: the machine epsilon of the input's dtype.
#[derive(Debug)]
pub struct RmsNorm {
    pub ndim: usize,
    pub eps: Option<f64>,
}

/// `nn.GroupNorm`: statistics per (sample, group) over the group's channels and positions.
#[derive(Debug)]
pub struct GroupNorm {
    pub groups: i64,
    pub eps: f64,
}

/// Without running statistics, eval mode normalises with the batch's statistics: samples
/// interact, so no per-sample rule applies.
pub fn batch_norm_from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    let (mean, var) = (m.getattr("running_mean")?, m.getattr("running_var")?);
    if mean.is_none() || var.is_none() {
        return Ok(None);
    }
    Ok(Some(Arc::new(BatchNorm::new(
        mean.extract::<PyTensor>()?.0,
        var.extract::<PyTensor>()?.0,
        m.getattr("eps")?.extract()?,
    ))))
}

pub fn layer_norm_from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(LayerNorm {
        ndim: m.getattr("normalized_shape")?.len()?,
        eps: m.getattr("eps")?.extract()?,
    })))
}

/// `nn.RMSNorm` (without `elementwise_affine` it has no parameter, so no rule is asked for).
pub fn rms_norm_from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(RmsNorm {
        ndim: m.getattr("normalized_shape")?.len()?,
        eps: m.getattr("eps")?.extract()?,
    })))
}

/// The Hugging Face RMSNorm classes of Llama, Mistral and Qwen: a `[hidden]` weight over the last
/// dimension, epsilon `variance_epsilon`.
pub fn hf_rms_norm_from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(RmsNorm {
        ndim: 1,
        eps: Some(m.getattr("variance_epsilon")?.extract()?),
    })))
}

pub fn group_norm_from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(GroupNorm {
        groups: m.getattr("num_groups")?.extract()?,
        eps: m.getattr("eps")?.extract()?,
    })))
}

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

fn affine(g: &Tensor, xhat: &Tensor, want: Want, reduce: impl Fn(&Tensor) -> Tensor) -> Slots {
    let w = want.weight.then(|| reduce(&(g * xhat)));
    let b = want.bias.then(|| reduce(g));
    [w, b]
}

impl Rule for BatchNorm {
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        let g = g.to_kind(Kind::Float);
        let a = a.to_kind(Kind::Float);
        let (mean, var) = {
            let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            (stats.0.shallow_clone(), stats.1.shallow_clone())
        };
        let xhat = (a - channel_view(&mean, &g)) * (channel_view(&var, &g) + self.eps).rsqrt();
        Ok(affine(&g, &xhat, want, sum_spatial))
    }
}

impl Rule for LayerNorm {
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        let g = g.to_kind(Kind::Float);
        let a = a.to_kind(Kind::Float);
        let d = a.dim() as i64;
        let dims: Vec<i64> = ((d - self.ndim as i64)..d).collect();
        let mean = a.mean_dim(dims.as_slice(), true, Kind::Float);
        let var = a.var_dim(dims.as_slice(), false, true);
        let xhat = (&a - mean) * (var + self.eps).rsqrt();
        Ok(affine(&g, &xhat, want, |t| sum_middle(t, self.ndim)))
    }
}

/// Machine epsilon of a floating dtype (`torch.finfo(dtype).eps`).
fn machine_eps(kind: Kind) -> f64 {
    match kind {
        Kind::Half => 0.0009765625,
        Kind::BFloat16 => 0.0078125,
        Kind::Double => f64::EPSILON,
        _ => f32::EPSILON as f64,
    }
}

impl Rule for RmsNorm {
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        let eps = self.eps.unwrap_or_else(|| machine_eps(a.kind()));
        let g = g.to_kind(Kind::Float);
        let a = a.to_kind(Kind::Float);
        let d = a.dim() as i64;
        let dims: Vec<i64> = ((d - self.ndim as i64)..d).collect();
        let ms = a.square().mean_dim(dims.as_slice(), true, Kind::Float);
        let xhat = &a * (ms + eps).rsqrt();
        Ok(affine(&g, &xhat, want, |t| sum_middle(t, self.ndim)))
    }
}

impl Rule for GroupNorm {
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        let g = g.to_kind(Kind::Float);
        let a = a.to_kind(Kind::Float);
        let shape = a.size();
        let grouped = a.reshape([shape[0], self.groups, -1]);
        let mean = grouped.mean_dim(2, true, Kind::Float);
        let var = grouped.var_dim(2, false, true);
        let xhat = ((grouped - mean) * (var + self.eps).rsqrt()).reshape(shape.as_slice());
        Ok(affine(&g, &xhat, want, sum_spatial))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{autograd_per_sample, rel, OPTS};
    use super::*;

    #[test]
    fn group_norm_matches_autograd() {
        tch::manual_seed(4);
        let a = Tensor::randn([3, 6, 5], OPTS);
        let g = Tensor::randn([3, 6, 5], OPTS);
        let w = Tensor::randn([6], OPTS);
        let gn = |x: &Tensor, w: &Tensor| x.group_norm::<&Tensor>(3, Some(w), None, 1e-5, false);
        let want = autograd_per_sample(&a, &g, &w, gn);
        let rule = GroupNorm {
            groups: 3,
            eps: 1e-5,
        };
        let got = rule.per_sample(&a, &g, Want::BOTH).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-4);
    }

    #[test]
    fn layer_norm_matches_autograd() {
        tch::manual_seed(5);
        let a = Tensor::randn([4, 3, 5], OPTS);
        let g = Tensor::randn([4, 3, 5], OPTS);
        let w = Tensor::randn([5], OPTS);
        let ln = |x: &Tensor, w: &Tensor| x.layer_norm::<&Tensor>([5], Some(w), None, 1e-5, false);
        let want = autograd_per_sample(&a, &g, &w, ln);
        let rule = LayerNorm { ndim: 1, eps: 1e-5 };
        let got = rule.per_sample(&a, &g, Want::WEIGHT).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-4);
    }

    #[test]
    fn rms_norm_matches_autograd() {
        tch::manual_seed(7);
        let a = Tensor::randn([4, 3, 5], OPTS);
        let g = Tensor::randn([4, 3, 5], OPTS);
        let w = Tensor::randn([5], OPTS);
        let rms = |x: &Tensor, w: &Tensor| {
            let ms = x.square().mean_dim(-1, true, Kind::Float);
            w * (x * (ms + 1e-6).rsqrt())
        };
        let want = autograd_per_sample(&a, &g, &w, rms);
        let rule = RmsNorm {
            ndim: 1,
            eps: Some(1e-6),
        };
        let got = rule.per_sample(&a, &g, Want::WEIGHT).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-4);
    }

    #[test]
    fn batch_norm_eval_matches_autograd() {
        tch::manual_seed(6);
        let a = Tensor::randn([4, 3, 2, 2], OPTS);
        let g = Tensor::randn([4, 3, 2, 2], OPTS);
        let w = Tensor::randn([3], OPTS);
        let (mean, var) = (Tensor::randn([3], OPTS), Tensor::rand([3], OPTS) + 0.5);
        let bn = |x: &Tensor, w: &Tensor| {
            x.batch_norm::<&Tensor>(
                Some(w),
                None,
                Some(&mean),
                Some(&var),
                false,
                0.1,
                1e-5,
                false,
            )
        };
        let want = autograd_per_sample(&a, &g, &w, bn);
        let rule = BatchNorm::new(mean.shallow_clone(), var.shallow_clone(), 1e-5);
        let got = rule.per_sample(&a, &g, Want::WEIGHT).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-4);
    }
}
