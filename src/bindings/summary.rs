//! Fisher statistics (`crate::summary`) returned as numpy arrays made here and owned by Python
//! (the `numpy` crate: no buffer is borrowed from Python or from a tensor).

use crate::summary;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

type Arrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray2<f64>>,
    Bound<'py, PyArray2<i64>>,
);

/// Per-tensor statistics, computed without the GIL.
///
/// Args:
///     tensors: the tensors (any float dtype and device).
///     levels: quantile levels in [0, 1].
///     edges: strictly increasing histogram edges.
/// Returns:
///     `(count, sum, max, quantiles, histogram)`: int64 and float64 arrays of one row per tensor;
///     `quantiles` is T × len(levels) (linear interpolation), `histogram` T × (len(edges) + 1)
///     (below `edges[0]`, each `[edges[k], edges[k+1])`, from `edges[-1]` on).
#[pyfunction]
#[pyo3(name = "fisher_summary")]
pub fn fisher_summary<'py>(
    py: Python<'py>,
    tensors: Vec<PyTensor>,
    levels: Vec<f64>,
    edges: Vec<f64>,
) -> PyResult<Arrays<'py>> {
    let tensors: Vec<tch::Tensor> = tensors.into_iter().map(|t| t.0).collect();
    let (rows, q, b) = (tensors.len(), levels.len(), edges.len() + 1);
    let s = py.allow_threads(move || summary::summarize(&tensors, &levels, &edges))?;
    let shaped = |what: &str, e: numpy::ndarray::ShapeError| {
        pyo3::exceptions::PyRuntimeError::new_err(format!("fisher summary ({what}): {e}"))
    };
    let quantiles =
        Array2::from_shape_vec((rows, q), s.quantiles).map_err(|e| shaped("quantiles", e))?;
    let histogram =
        Array2::from_shape_vec((rows, b), s.histogram).map_err(|e| shaped("histogram", e))?;
    Ok((
        s.count.into_pyarray(py),
        s.sum.into_pyarray(py),
        s.max.into_pyarray(py),
        quantiles.into_pyarray(py),
        histogram.into_pyarray(py),
    ))
}
