//! `ewc_rs._core`: the pymodule glue. Arguments are pulled out of Python objects first, the
//! heavy work then runs with the GIL released, and crate errors become Python exceptions.

pub mod error;
pub mod fisher;
pub mod penalty;

use error::{EwcError, Result};
use fisher::driver::{self, Accumulators, BatchJob, Capture};
use fisher::roots::{self, FisherKind, Likelihood, RootInputs};
use fisher::rules::{ConvGeometry, Rule};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

fn to_py(e: EwcError) -> PyErr {
    match e {
        EwcError::Value(m) => PyValueError::new_err(m),
        EwcError::Type(m) => PyTypeError::new_err(m),
        e @ EwcError::Torch(..) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// A layer call as the Python side records it:
/// `(rule, input, output, weight_slot, bias_slot, ints, floats, tensors)`.
#[derive(FromPyObject)]
struct PyCapture(
    String,
    PyTensor,
    PyTensor,
    Option<usize>,
    Option<usize>,
    Vec<i64>,
    Vec<f64>,
    Vec<PyTensor>,
);

fn arg<T: Copy>(v: &[T], i: usize, rule: &str) -> Result<T> {
    v.get(i).copied().ok_or_else(|| {
        EwcError::Value(format!(
            "capture of rule '{rule}': missing configuration value {i}"
        ))
    })
}

impl PyCapture {
    fn into_capture(self) -> Result<Capture> {
        let PyCapture(name, input, output, w, b, ints, floats, tensors) = self;
        let rule = match name.as_str() {
            "linear" => Rule::Linear,
            "conv" => {
                // ints = [dims, kernel.., stride.., padding.., dilation.., groups]
                let d = arg(&ints, 0, &name)? as usize;
                if ints.len() != 2 + 4 * d {
                    return error::value_err(format!(
                        "conv capture: expected {} ints, got {}",
                        2 + 4 * d,
                        ints.len()
                    ));
                }
                let part = |k: usize| ints[1 + k * d..1 + (k + 1) * d].to_vec();
                Rule::Conv(ConvGeometry::new(
                    part(0),
                    part(1),
                    part(2),
                    part(3),
                    ints[1 + 4 * d],
                )?)
            }
            "batch_norm" => {
                let mut it = tensors.into_iter();
                match (it.next(), it.next()) {
                    (Some(mean), Some(var)) => Rule::BatchNorm {
                        mean: mean.0,
                        var: var.0,
                        eps: arg(&floats, 0, &name)?,
                    },
                    _ => {
                        return error::value_err(
                            "batch_norm capture: expected running mean and var",
                        )
                    }
                }
            }
            "layer_norm" => Rule::LayerNorm {
                ndim: arg(&ints, 0, &name)? as usize,
                eps: arg(&floats, 0, &name)?,
            },
            "group_norm" => Rule::GroupNorm {
                groups: arg(&ints, 0, &name)?,
                eps: arg(&floats, 0, &name)?,
            },
            "embedding" => {
                let pad = arg(&ints, 1, &name)?;
                Rule::Embedding {
                    num_embeddings: arg(&ints, 0, &name)?,
                    padding_idx: (pad >= 0).then_some(pad),
                }
            }
            other => return error::value_err(format!("unknown rule {other:?}")),
        };
        Ok(Capture {
            rule,
            input: input.0,
            output: output.0,
            slots: [w, b],
        })
    }
}

fn captures(list: Vec<PyCapture>) -> Result<Vec<Capture>> {
    list.into_iter().map(PyCapture::into_capture).collect()
}

/// Adds one batch's Σ_n (per-sample gradient)² into `accumulators`, in place.
///
/// Args:
///     outputs: the model's outputs for the batch (connected to the autograd graph).
///     targets: labels ([N] integers) or regression targets ([N, D]); None when unused.
///     kind: 'exact', 'mc', 'empirical' or 'batched'.
///     likelihood: 'categorical', 'gaussian' or 'custom'.
///     mc: sampled labels [N, S] (categorical) or noise [N, S, D] (gaussian) for kind 'mc'.
///     loglik: per-sample log-likelihood [N] for likelihood 'custom'.
///     captures: recorded layer calls `(rule, input, output, weight_slot, bias_slot, ints,
///         floats, tensors)`.
///     direct: `(tensor, slot)` pairs whose whole gradient is squared (one-sample passes, batched).
///     accumulators: float32 tensors, one per slot, updated in place.
///     names: parameter names per slot, for error messages.
///     budget_bytes: bound on per-sample intermediates.
#[pyfunction]
#[pyo3(signature = (outputs, targets, kind, likelihood, mc, loglik, captures, direct, accumulators, names, budget_bytes))]
#[allow(clippy::too_many_arguments)]
fn fisher_accumulate(
    py: Python<'_>,
    outputs: PyTensor,
    targets: Option<PyTensor>,
    kind: &str,
    likelihood: &str,
    mc: Option<PyTensor>,
    loglik: Option<PyTensor>,
    captures: Vec<PyCapture>,
    direct: Vec<(PyTensor, usize)>,
    accumulators: Vec<PyTensor>,
    names: Vec<String>,
    budget_bytes: i64,
) -> PyResult<()> {
    let kind = FisherKind::parse(kind).map_err(to_py)?;
    let likelihood = Likelihood::parse(likelihood).map_err(to_py)?;
    let captures = self::captures(captures).map_err(to_py)?;
    let accs = Accumulators {
        tensors: accumulators.into_iter().map(|t| t.0).collect(),
        names,
    };
    let direct = direct.into_iter().map(|(t, s)| (t.0, s)).collect();
    let (outputs, targets, mc, loglik) = (
        outputs.0,
        targets.map(|t| t.0),
        mc.map(|t| t.0),
        loglik.map(|t| t.0),
    );
    py.allow_threads(move || {
        let roots = roots::build(&RootInputs {
            outputs: &outputs,
            targets: targets.as_ref(),
            kind,
            likelihood,
            mc: mc.as_ref(),
            loglik: loglik.as_ref(),
        })?;
        let job = BatchJob {
            roots,
            captures,
            direct,
            budget: budget_bytes,
        };
        driver::accumulate(&job, &accs)
    })
    .map_err(to_py)
}

/// Relative difference, per slot, between the rules' summed per-sample gradients and autograd's
/// gradient of the first root; large values flag parameters used outside their layer.
///
/// Args: as `fisher_accumulate`, with `params` the `(slot, parameter)` pairs to check.
/// Returns: list of `(slot, relative_difference)`.
#[pyfunction]
#[pyo3(signature = (outputs, targets, kind, likelihood, mc, loglik, captures, params, budget_bytes))]
#[allow(clippy::too_many_arguments)]
fn fisher_rule_mismatch(
    py: Python<'_>,
    outputs: PyTensor,
    targets: Option<PyTensor>,
    kind: &str,
    likelihood: &str,
    mc: Option<PyTensor>,
    loglik: Option<PyTensor>,
    captures: Vec<PyCapture>,
    params: Vec<(usize, PyTensor)>,
    budget_bytes: i64,
) -> PyResult<Vec<(usize, f64)>> {
    let kind = FisherKind::parse(kind).map_err(to_py)?;
    let likelihood = Likelihood::parse(likelihood).map_err(to_py)?;
    let captures = self::captures(captures).map_err(to_py)?;
    let params: Vec<(usize, tch::Tensor)> = params.into_iter().map(|(s, t)| (s, t.0)).collect();
    let (outputs, targets, mc, loglik) = (
        outputs.0,
        targets.map(|t| t.0),
        mc.map(|t| t.0),
        loglik.map(|t| t.0),
    );
    py.allow_threads(move || {
        let roots = roots::build(&RootInputs {
            outputs: &outputs,
            targets: targets.as_ref(),
            kind,
            likelihood,
            mc: mc.as_ref(),
            loglik: loglik.as_ref(),
        })?;
        driver::rule_mismatch(&roots[0], &captures, &params, budget_bytes)
    })
    .map_err(to_py)
}

/// The fused EWC penalty over a group of parameters sharing dtype and device.
///
/// Args:
///     params: the parameter tensors (read only).
///     star: flat θ* buffer (float32 or bfloat16), the parameters' total length.
///     fisher: flat F buffer, same length and dtype as `star`.
///     lam: λ.
///     out: optional flat gradient buffer to write into (parameters' dtype, device and total
///         length, contiguous); a fresh one is allocated when omitted.
/// Returns:
///     `(value, grad, views)`: (λ/2) Σ F (θ−θ*)² as a 0-d float32 tensor, λF(θ−θ*) as one flat
///     tensor in the parameters' dtype, and its views shaped like each parameter.
#[pyfunction]
#[pyo3(name = "penalty", signature = (params, star, fisher, lam, out=None))]
fn penalty_py(
    py: Python<'_>,
    params: Vec<PyTensor>,
    star: PyTensor,
    fisher: PyTensor,
    lam: f64,
    out: Option<PyTensor>,
) -> PyResult<(PyTensor, PyTensor, Vec<PyTensor>)> {
    let params: Vec<tch::Tensor> = params.into_iter().map(|t| t.0).collect();
    let (star, fisher, out) = (star.0, fisher.0, out.map(|t| t.0));
    let out = py
        .allow_threads(move || penalty::penalty(&params, &star, &fisher, lam, out))
        .map_err(to_py)?;
    let views = out.views.into_iter().map(PyTensor).collect();
    Ok((PyTensor(out.value), PyTensor(out.grad), views))
}

/// Adds `scale` × the penalty's gradient straight into the parameters' `.grad` (CPU), in the
/// pass that computes the value: no autograd graph.
///
/// Args:
///     params: the parameter tensors (their `.grad` is updated in place where possible), all
///         float32/float16/bfloat16 on CPU.
///     star: flat θ* buffer (float32 or bfloat16), the parameters' total length.
///     fisher: flat F buffer, same length and dtype as `star`.
///     lam: λ.
///     scale: multiplies the gradient only (e.g. a gradient scaler's factor).
/// Returns:
///     `(value, pending)`: the penalty as a 0-d float32 tensor, and `(index, gradient)` for each
///     parameter requiring grad whose `.grad` could not be updated in place: install it as
///     `.grad` when there was none, else add it (the `.grad` has another dtype or layout).
#[pyfunction]
#[pyo3(name = "accumulate")]
fn accumulate_py(
    py: Python<'_>,
    params: Vec<PyTensor>,
    star: PyTensor,
    fisher: PyTensor,
    lam: f64,
    scale: f64,
) -> PyResult<(PyTensor, Vec<(usize, PyTensor)>)> {
    let params: Vec<tch::Tensor> = params.into_iter().map(|t| t.0).collect();
    let (star, fisher) = (star.0, fisher.0);
    let out = py
        .allow_threads(move || penalty::accumulate(&params, &star, &fisher, lam, scale))
        .map_err(to_py)?;
    let pending = out
        .pending
        .into_iter()
        .map(|(i, t)| (i, PyTensor(t)))
        .collect();
    Ok((PyTensor(out.value), pending))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION", "2.11.0")?;
    m.add_function(wrap_pyfunction!(fisher_accumulate, m)?)?;
    m.add_function(wrap_pyfunction!(fisher_rule_mismatch, m)?)?;
    m.add_function(wrap_pyfunction!(penalty_py, m)?)?;
    m.add_function(wrap_pyfunction!(accumulate_py, m)?)?;
    Ok(())
}
