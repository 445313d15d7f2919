//! The fused penalty's two entry points: for autograd (a flat gradient and its views) and for
//! `EWC.backward` (added straight into `.grad`).

use crate::penalty::{self, Fisher};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

fn tensors(list: Vec<PyTensor>) -> Vec<Tensor> {
    list.into_iter().map(|t| t.0).collect()
}

/// F as the pass reads it: dense, or 8-bit codes with their scales and block size.
fn fisher_of<'a>(f: &'a Tensor, code: Option<&'a (Tensor, usize)>) -> Fisher<'a> {
    match code {
        None => Fisher::Dense(f),
        Some((scales, block)) => Fisher::Coded {
            codes: f,
            scales,
            block: *block,
        },
    }
}

/// The fused EWC penalty over a group of parameters sharing dtype and device.
///
/// Args:
///     params: the parameter tensors (read only).
///     star: flat θ* buffer (float32 or bfloat16), the parameters' total length.
///     fisher: flat F buffer, same length and dtype as `star`; or, with `fisher_code`, F's
///         8-bit codes (flat uint8, `ewc_rs._core.fisher8_quantize` of each parameter's F).
///     lam: λ.
///     fisher_code: for 8-bit F, `(scales, block)`: the float32 `[blocks, 2]` scales (the
///         parameters' blocks in order) and the block size.
///     out: optional flat gradient buffer to write into (parameters' dtype, device and total
///         length, contiguous, starting its storage, sharing no memory with `params`, `star` or
///         `fisher`); a fresh one is allocated when omitted.
/// Returns:
///     `(value, grad, views)`: (λ/2) Σ F (θ−θ*)² as a 0-d float32 tensor, λF(θ−θ*) as one flat
///     tensor in the parameters' dtype, and its views shaped like each parameter.
#[pyfunction]
#[pyo3(
    name = "penalty",
    signature = (params, star, fisher, lam, out=None, *, fisher_code=None)
)]
pub fn fused_penalty(
    py: Python<'_>,
    params: Vec<PyTensor>,
    star: PyTensor,
    fisher: PyTensor,
    lam: f64,
    out: Option<PyTensor>,
    fisher_code: Option<(PyTensor, usize)>,
) -> PyResult<(PyTensor, PyTensor, Vec<PyTensor>)> {
    let params = tensors(params);
    let (star, f, out) = (star.0, fisher.0, out.map(|t| t.0));
    let code = fisher_code.map(|(s, b)| (s.0, b));
    let result = py.allow_threads(move || {
        penalty::penalty(&params, &star, fisher_of(&f, code.as_ref()), lam, out)
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
///     fisher_code: for 8-bit F, `(scales, block)` (see `penalty`).
/// Returns:
///     `(value, pending)`: the penalty as a 0-d float32 tensor, and `(index, gradient)` for each
///     parameter requiring grad whose `.grad` could not be updated in place: install it as
///     `.grad` when there was none, else add it (the `.grad` has another dtype or layout, or
///     shares memory with what the pass reads).
#[pyfunction]
#[pyo3(signature = (params, star, fisher, lam, scale, *, fisher_code=None))]
pub fn penalty_add_to_grads(
    py: Python<'_>,
    params: Vec<PyTensor>,
    star: PyTensor,
    fisher: PyTensor,
    lam: f64,
    scale: f64,
    fisher_code: Option<(PyTensor, usize)>,
) -> PyResult<(PyTensor, Vec<(usize, PyTensor)>)> {
    let params = tensors(params);
    let (star, f) = (star.0, fisher.0);
    let code = fisher_code.map(|(s, b)| (s.0, b));
    let result = py.allow_threads(move || {
        penalty::add_to_grads(&params, &star, fisher_of(&f, code.as_ref()), lam, scale)
    })?;
    super::cuda::warn_if_fell_back(py)?;
    let pending = result
        .pending
        .into_iter()
        .map(|(i, t)| (i, PyTensor(t)))
        .collect();
    Ok((PyTensor(result.value), pending))
}
