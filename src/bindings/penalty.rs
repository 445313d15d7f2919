//! The fused penalty's two entry points: for autograd (a flat gradient and its views) and for
//! `EWC.backward` (added straight into `.grad`).

use crate::error::{EwcError, Result};
use crate::penalty::{self, Fisher};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

fn tensors(list: Vec<PyTensor>) -> Vec<Tensor> {
    list.into_iter().map(|t| t.0).collect()
}

/// F as the pass reads it: dense, or 8-bit codes with their scales and block size.
fn fisher_of<'a>(f: &'a Tensor, scales: Option<&'a Tensor>, block: usize) -> Result<Fisher<'a>> {
    match scales {
        None if block == 0 => Ok(Fisher::Dense(f)),
        None => Err(EwcError::Value(format!(
            "fisher_block: expected 0 without fisher_scales (a dense F), got {block}"
        ))),
        Some(scales) => Ok(Fisher::Coded {
            codes: f,
            scales,
            block,
        }),
    }
}

/// The fused EWC penalty over a group of parameters sharing dtype and device.
///
/// Args:
///     params: the parameter tensors (read only).
///     star: flat θ* buffer (float32 or bfloat16), the parameters' total length.
///     fisher: flat F buffer, same length and dtype as `star`; or, with `fisher_scales`, F's
///         8-bit codes (flat uint8, `ewc_rs._core.fisher8_quantize` of each parameter's F).
///     lam: λ.
///     fisher_scales: 8-bit F's float32 `[blocks, 2]` scales, the parameters' blocks in order.
///     fisher_block: 8-bit F's block size (0 for a dense F).
///     out: optional flat gradient buffer to write into (parameters' dtype, device and total
///         length, contiguous, starting its storage, sharing no memory with `params`, `star` or
///         `fisher`); a fresh one is allocated when omitted.
/// Returns:
///     `(value, grad, views)`: (λ/2) Σ F (θ−θ*)² as a 0-d float32 tensor, λF(θ−θ*) as one flat
///     tensor in the parameters' dtype, and its views shaped like each parameter.
#[pyfunction]
#[pyo3(
    name = "penalty",
    signature = (params, star, fisher, lam, out=None, *, fisher_scales=None, fisher_block=0)
)]
#[allow(clippy::too_many_arguments)]
pub fn fused_penalty(
    py: Python<'_>,
    params: Vec<PyTensor>,
    star: PyTensor,
    fisher: PyTensor,
    lam: f64,
    out: Option<PyTensor>,
    fisher_scales: Option<PyTensor>,
    fisher_block: usize,
) -> PyResult<(PyTensor, PyTensor, Vec<PyTensor>)> {
    let params = tensors(params);
    let (star, f, out) = (star.0, fisher.0, out.map(|t| t.0));
    let scales = fisher_scales.map(|t| t.0);
    let result = py.allow_threads(move || {
        let fisher = fisher_of(&f, scales.as_ref(), fisher_block)?;
        penalty::penalty(&params, &star, fisher, lam, out)
    })?;
    super::cuda::warn_if_fell_back(py)?;
    let views = result.views.into_iter().map(PyTensor).collect();
    Ok((PyTensor(result.value), PyTensor(result.grad), views))
}

/// Adds `scale` × the penalty's gradient straight into the parameters' `.grad` (CPU, CUDA), in the
/// pass that computes the value: no autograd graph.
///
/// Args:
///     params: the parameter tensors (their `.grad` is updated in place where possible), all
///         float32/float16/bfloat16 on one CPU or CUDA device.
///     star: flat θ* buffer (float32 or bfloat16), the parameters' total length.
///     fisher: flat F buffer, same length and dtype as `star`; or 8-bit codes (see `penalty`).
///     lam: λ.
///     scale: multiplies the gradient only (e.g. a gradient scaler's factor).
///     fisher_scales: 8-bit F's scales (see `penalty`).
///     fisher_block: 8-bit F's block size (0 for a dense F).
/// Returns:
///     `(value, pending)`: the penalty as a 0-d float32 tensor, and `(index, gradient)` for each
///     parameter requiring grad whose `.grad` could not be updated in place: install it as
///     `.grad` when there was none, else add it (the `.grad` has another dtype or layout, or
///     shares memory with what the pass reads).
#[pyfunction]
#[pyo3(signature = (params, star, fisher, lam, scale, *, fisher_scales=None, fisher_block=0))]
#[allow(clippy::too_many_arguments)]
pub fn penalty_add_to_grads(
    py: Python<'_>,
    params: Vec<PyTensor>,
    star: PyTensor,
    fisher: PyTensor,
    lam: f64,
    scale: f64,
    fisher_scales: Option<PyTensor>,
    fisher_block: usize,
) -> PyResult<(PyTensor, Vec<(usize, PyTensor)>)> {
    let params = tensors(params);
    let (star, f) = (star.0, fisher.0);
    let scales = fisher_scales.map(|t| t.0);
    let result = py.allow_threads(move || {
        let fisher = fisher_of(&f, scales.as_ref(), fisher_block)?;
        penalty::add_to_grads(&params, &star, fisher, lam, scale)
    })?;
    super::cuda::warn_if_fell_back(py)?;
    let pending = result
        .pending
        .into_iter()
        .map(|(i, t)| (i, PyTensor(t)))
        .collect();
    Ok((PyTensor(result.value), pending))
}
