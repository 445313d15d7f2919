//! KFAC's boundary types: `KfacSums` (the factor sums `FisherSums.add_batch(kfac=...)` adds
//! into) and `KronPlan` (the Kronecker-factored penalty, one call per step).

use crate::kfac::factors;
use crate::kfac::penalty::{self, KronLayout, KronStack};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tch::Tensor;

/// Σ ã ãᵀ and Σ g gᵀ per KFAC site over the batches of one estimation (see `crate::kfac`).
///
/// Args (keyword-only):
///     a_sums: per site, a zero float32 matrix [in(+1), in(+1)] to add Σ ã ãᵀ into (a 1 is
///         appended to each input row when it is one larger than the rows: the bias).
///     g_sums: per site, a zero float32 matrix [out, out] to add Σ_roots Σ_rows g gᵀ into.
#[pyclass(module = "ewc_rs._core", frozen)]
pub struct KfacSums {
    pub(crate) sums: Mutex<factors::KfacSums>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[pymethods]
impl KfacSums {
    #[new]
    #[pyo3(signature = (*, a_sums, g_sums))]
    fn new(a_sums: Vec<PyTensor>, g_sums: Vec<PyTensor>) -> PyResult<Self> {
        let a = a_sums.into_iter().map(|t| t.0).collect();
        let g = g_sums.into_iter().map(|t| t.0).collect();
        Ok(Self {
            sums: Mutex::new(factors::KfacSums::new(a, g)?),
        })
    }

    /// The input rows added so far per site (samples × positions), A's divisor.
    #[getter]
    fn rows(&self) -> Vec<i64> {
        lock(&self.sums).rows()
    }
}

/// The Kronecker-factored penalty's (layer, task) pairs, stacked by shape once (see `crate::kfac::penalty`).
///
/// Args (keyword-only):
///     transposed: per layer, whether its weight is stored [in, out] (transformers' Conv1D).
///     has_bias: per layer, whether a bias column is appended to W̃.
///     stacks: `(layers, star, a, g)` per shape: the layer index of each of the k pairs, W̃*
///         [k, out, in(+1)], A [k, in(+1), in(+1)], G [k, out, out] (float32).
#[pyclass(module = "ewc_rs._core", frozen)]
pub struct KronPlan {
    plan: Mutex<penalty::KronPlan>,
}

type StackArg = (Vec<usize>, PyTensor, PyTensor, PyTensor);

#[pymethods]
impl KronPlan {
    #[new]
    #[pyo3(signature = (*, transposed, has_bias, stacks))]
    fn new(transposed: Vec<bool>, has_bias: Vec<bool>, stacks: Vec<StackArg>) -> PyResult<Self> {
        if transposed.len() != has_bias.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "transposed, has_bias: expected one entry per layer in each, got {} and {}",
                transposed.len(),
                has_bias.len()
            )));
        }
        let layouts = transposed
            .into_iter()
            .zip(has_bias)
            .map(|(transposed, bias)| KronLayout { transposed, bias })
            .collect();
        let stacks = stacks
            .into_iter()
            .map(|(layers, star, a, g)| KronStack {
                layers,
                star: star.0,
                a: a.0,
                g: g.0,
            })
            .collect();
        Ok(Self {
            plan: Mutex::new(penalty::KronPlan::new(layouts, stacks)?),
        })
    }

    /// ½λ Σ tr(ΔW̃ᵀ G ΔW̃ A) and its gradient, in one call.
    ///
    /// Args:
    ///     weights: per layer, its weight (read, never written).
    ///     biases: per layer, its bias or None (as `has_bias`).
    ///     lam: λ.
    /// Returns:
    ///     `(value, weight_grads, bias_grads)`: a 0-d float32 tensor, and λ G ΔW̃ A per layer in
    ///     each parameter's shape and dtype (None for a layer without a bias).
    #[allow(clippy::type_complexity)]
    fn evaluate(
        &self,
        py: Python<'_>,
        weights: Vec<PyTensor>,
        biases: Vec<Option<PyTensor>>,
        lam: f64,
    ) -> PyResult<(PyTensor, Vec<PyTensor>, Vec<Option<PyTensor>>)> {
        let weights: Vec<Tensor> = weights.into_iter().map(|t| t.0).collect();
        let biases: Vec<Option<Tensor>> = biases.into_iter().map(|b| b.map(|t| t.0)).collect();
        let plan = &self.plan;
        let r = py.allow_threads(move || lock(plan).evaluate(&weights, &biases, lam))?;
        Ok((
            PyTensor(r.value),
            r.weight_grads.into_iter().map(PyTensor).collect(),
            r.bias_grads.into_iter().map(|b| b.map(PyTensor)).collect(),
        ))
    }
}
