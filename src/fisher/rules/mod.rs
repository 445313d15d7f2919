//! Per-layer rules: from a layer's input `a` and the gradient `g` of a per-sample-separable
//! scalar w.r.t. the layer's output, compute each parameter's per-sample gradients, or directly
//! the sum over samples of their squares (the Fisher's numerator) when that is cheaper.
//!
//! One small rule per layer type, in its own file: the maths (a `Rule`) and how its settings are
//! read from the PyTorch module (`from_module`). `REGISTRY` maps the module's exact Python type
//! to that reader; adding a layer is one rule file plus one line there. Every rule works in
//! float32.

mod conv;
mod embedding;
mod linear;
mod norm;
#[cfg(test)]
mod test_support;

use crate::error::{value_err, Result};
use crate::fisher::chunks::{add_to, chunks, Workspace};
use pyo3::prelude::*;
use std::fmt;
use std::sync::Arc;
use tch::{Kind, Tensor};

pub use conv::Conv;
pub use embedding::Embedding;
pub use linear::{Linear, WeightLayout};
pub use norm::{BatchNorm, GroupNorm, LayerNorm, RmsNorm};

/// Which of a layer's two parameters (weight, bias) a rule is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub weight: bool,
    pub bias: bool,
}

impl Want {
    pub const BOTH: Want = Want {
        weight: true,
        bias: true,
    };
    pub const WEIGHT: Want = Want {
        weight: true,
        bias: false,
    };
}

/// Per-parameter results of a rule: index 0 is the weight, index 1 the bias.
pub type Slots = [Option<Tensor>; 2];

/// A layer's weight as the matrix of its Kronecker-factored Fisher block (`crate::kfac`):
/// `outputs` rows, `inputs` columns (bias column not counted); `transposed` when the weight is
/// stored `[in, out]` (transformers' `Conv1D`), else it is `weight.reshape(out, -1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KfacForm {
    pub inputs: i64,
    pub outputs: i64,
    pub transposed: bool,
}

/// The maths of one layer type.
pub trait Rule: Send + Sync + fmt::Debug {
    /// Per-sample gradients `[n, *param_shape]` of the requested parameters.
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots>;

    /// Elements that `per_sample` materialises per sample (bounds the chunk size).
    fn per_sample_elems(&self, a: &Tensor, g: &Tensor) -> i64 {
        let n = a.size()[0].max(1);
        4 * (a.numel() as i64 + g.numel() as i64) / n
    }

    /// Σ_n (per-sample gradient)² of the requested parameters (default: the one GEMM of
    /// `outer_product_sum_sq` when `is_outer_product(a)`, else `chunked_sum_sq`).
    fn sum_sq(&self, a: &Tensor, g: &Tensor, want: Want, ws: &Workspace) -> Result<Slots> {
        if self.is_outer_product(a) {
            return self.outer_product_sum_sq(a, &g.to_kind(Kind::Float).square(), want);
        }
        chunked_sum_sq(self, a, g, want, ws)
    }

    /// Σ_n (per-sample gradient) of the requested parameters, i.e. the gradient of the summed
    /// scalar (the rule checks compare it with autograd's). Default: `per_sample` in chunks of
    /// `ws.budget`, summed; a rule with a cheaper sum overrides it.
    fn summed(&self, a: &Tensor, g: &Tensor, want: Want, ws: &Workspace) -> Result<Slots> {
        sum_over_chunks(a, g, self.chunk_size(a, g, ws.budget), |a, g| {
            self.per_sample(a, g, want)
        })
    }

    /// Adds this call's per-sample gradients `[n, *param]` into `acc` (weight, bias), for a
    /// parameter shared between layer calls; an absent entry becomes this call's. `fresh(shape)`
    /// gives an uninitialised float32 buffer for a new weight entry (a workspace buffer, valid for
    /// the chunk). Default: `per_sample`, added out of place; Linear and Embedding add in place.
    fn accumulate_per_sample(
        &self,
        acc: &mut Slots,
        a: &Tensor,
        g: &Tensor,
        want: Want,
        _fresh: &dyn Fn(&[i64]) -> Tensor,
    ) -> Result<()> {
        let ps = self.per_sample(a, g, want)?;
        for (acc, t) in acc.iter_mut().zip(ps) {
            if let Some(t) = t {
                add_to(acc, t);
            }
        }
        Ok(())
    }

    /// Whether this rule's per-sample gradient touches few entries of its parameter (Embedding):
    /// such calls are accumulated after the dense ones, into their buffers.
    fn sparse_per_sample(&self) -> bool {
        false
    }

    /// Whether each sample's weight gradient is one outer product of its input row and its
    /// output-gradient row for this input (a 2-d call of a Linear-like layer): then the squares
    /// of several roots' output gradients can be summed before the one GEMM of
    /// `outer_product_sum_sq`. A rule that answers true implements that method.
    fn is_outer_product(&self, _a: &Tensor) -> bool {
        false
    }

    /// Σ_n (per-sample gradient)² of an outer-product call (see `is_outer_product`), in the
    /// layer's own weight layout, from its input `a` `[N, in]` and the squared output gradient
    /// `g2` `[N, out]` — possibly already summed over several roots, since the squares of each
    /// root's outer products add up the same way. Nothing per sample is materialised.
    fn outer_product_sum_sq(&self, _a: &Tensor, _g2: &Tensor, _want: Want) -> Result<Slots> {
        value_err(format!("{self:?}: this rule has no outer-product form"))
    }

    /// KFAC: the weight as a matrix (see `KfacForm`), or None when this rule has no
    /// Kronecker-factored form (its parameters then get the diagonal Fisher).
    fn kfac_form(&self, _weight_shape: &[i64]) -> Option<KfacForm> {
        None
    }

    /// KFAC: the rows whose outer products make the input factor, `[rows, inputs]` in float32
    /// (a Linear's input with its leading dims flattened; a convolution's unfolded patches, one
    /// row per sample and output position). Only called when `kfac_form` is `Some`.
    fn kfac_input_rows(&self, _a: &Tensor) -> Result<Tensor> {
        value_err(format!(
            "{self:?}: this rule has no Kronecker-factored form"
        ))
    }

    /// KFAC: the output gradient as rows `[rows, outputs]` in float32, row for row with
    /// `kfac_input_rows`.
    fn kfac_grad_rows(&self, _g: &Tensor) -> Result<Tensor> {
        value_err(format!(
            "{self:?}: this rule has no Kronecker-factored form"
        ))
    }

    /// How many samples fit in `budget` bytes of per-sample intermediates.
    fn chunk_size(&self, a: &Tensor, g: &Tensor, budget: i64) -> i64 {
        let n = a.size()[0].max(1);
        (budget / (4 * self.per_sample_elems(a, g).max(1))).clamp(1, n)
    }
}

/// Σ_n (per-sample gradient)², materialising the per-sample gradients chunk by chunk, never
/// more than `budget` bytes at a time.
pub fn chunked_sum_sq<R: Rule + ?Sized>(
    rule: &R,
    a: &Tensor,
    g: &Tensor,
    want: Want,
    ws: &Workspace,
) -> Result<Slots> {
    sum_over_chunks(a, g, rule.chunk_size(a, g, ws.budget), |a, g| {
        Ok(rule.per_sample(a, g, want)?.map(|t| t.map(|t| t.square())))
    })
}

/// Walks `a` and `g` in chunks of `size` samples and sums over the samples what `per_chunk`
/// gives for each chunk (`[len, *param]` per slot), in float32.
pub(crate) fn sum_over_chunks(
    a: &Tensor,
    g: &Tensor,
    size: i64,
    mut per_chunk: impl FnMut(&Tensor, &Tensor) -> Result<Slots>,
) -> Result<Slots> {
    let mut out: Slots = [None, None];
    for (start, len) in chunks(a.size()[0], size) {
        let ts = per_chunk(&a.narrow(0, start, len), &g.narrow(0, start, len))?;
        for (acc, t) in out.iter_mut().zip(ts) {
            if let Some(t) = t {
                add_to(acc, t.sum_dim_intlist(0, false, Kind::Float));
            }
        }
    }
    Ok(out)
}

/// Reads a rule's settings from a module; `Ok(None)` when this instance's configuration is not
/// covered (its parameters then go to the exact fallback).
pub type FromModule = fn(&Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>>;

/// Module type (`__module__.__qualname__`, exact: a subclass may override `forward` and break a
/// rule's maths) → the reader of its rule.
pub const REGISTRY: &[(&str, FromModule)] = &[
    ("torch.nn.modules.linear.Linear", linear::from_module),
    ("torch.nn.modules.conv.Conv1d", conv::from_module),
    ("torch.nn.modules.conv.Conv2d", conv::from_module),
    (
        "torch.nn.modules.batchnorm.BatchNorm1d",
        norm::batch_norm_from_module,
    ),
    (
        "torch.nn.modules.batchnorm.BatchNorm2d",
        norm::batch_norm_from_module,
    ),
    (
        "torch.nn.modules.normalization.LayerNorm",
        norm::layer_norm_from_module,
    ),
    (
        "torch.nn.modules.normalization.GroupNorm",
        norm::group_norm_from_module,
    ),
    (
        "torch.nn.modules.normalization.RMSNorm",
        norm::rms_norm_from_module,
    ),
    (
        "transformers.models.llama.modeling_llama.LlamaRMSNorm",
        norm::hf_rms_norm_from_module,
    ),
    (
        "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
        norm::hf_rms_norm_from_module,
    ),
    (
        "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
        norm::hf_rms_norm_from_module,
    ),
    (
        "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm",
        norm::hf_rms_norm_from_module,
    ),
    ("torch.nn.modules.sparse.Embedding", embedding::from_module),
    ("transformers.pytorch_utils.Conv1D", linear::from_hf_conv1d),
];

/// The registry's reader for this module's exact type, if any.
pub fn lookup(type_name: &str) -> Option<FromModule> {
    REGISTRY
        .iter()
        .find(|(name, _)| *name == type_name)
        .map(|(_, f)| *f)
}

/// Sums `t` over every dimension except the first (the sample dimension) and the last
/// `keep_last`, e.g. `[N, ..., C]` → `[N, C]` with `keep_last = 1`.
pub(crate) fn sum_middle(t: &Tensor, keep_last: usize) -> Tensor {
    let d = t.dim();
    if d <= 1 + keep_last {
        return t.shallow_clone();
    }
    let dims: Vec<i64> = (1..(d - keep_last) as i64).collect();
    t.sum_dim_intlist(dims.as_slice(), false, Kind::Float)
}
