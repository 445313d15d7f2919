//! Fisher-weighted merging of one tensor (`crate::merge`), GIL released.

use crate::merge;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

/// One merged tensor: Σ w_i (F_i + eps) θ_i / Σ w_i (F_i + eps), or the weighted average
/// Σ w_i θ_i / Σ w_i without Fishers (also where every w_i (F_i + eps) is 0).
///
/// Args:
///     thetas: the models' tensors (one shape, float dtype and device).
///     fishers: one Fisher per tensor (any float dtype, same shape and device), or None.
///     weights: one finite non-negative weight per tensor, with a positive sum.
///     eps: added to every Fisher (≥ 0).
/// Returns:
///     The merged tensor, shaped, typed and placed like `thetas[0]`.
#[pyfunction]
#[pyo3(name = "merge", signature = (thetas, fishers, weights, eps))]
pub fn merge_tensor(
    py: Python<'_>,
    thetas: Vec<PyTensor>,
    fishers: Option<Vec<PyTensor>>,
    weights: Vec<f64>,
    eps: f64,
) -> PyResult<PyTensor> {
    let thetas: Vec<tch::Tensor> = thetas.into_iter().map(|t| t.0).collect();
    let fishers: Option<Vec<tch::Tensor>> = fishers.map(|f| f.into_iter().map(|t| t.0).collect());
    let out = py.allow_threads(move || merge::merge(&thetas, fishers.as_deref(), &weights, eps))?;
    Ok(PyTensor(out))
}
