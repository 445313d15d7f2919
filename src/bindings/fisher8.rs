//! The 8-bit Fisher's code (`crate::fisher8`): quantize and dequantize, without the GIL.

use crate::fisher8;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

/// The 8-bit log code of a non-negative tensor, per block of contiguous values.
///
/// Args:
///     fisher: the values (any float dtype, shape and device; read flattened), finite and ≥ 0.
///     block: values per scale block, a power of two from 16 to 65536.
///     range: binades a block spans at most below its maximum (smaller values flush to 0);
///         `inf` for no limit.
/// Returns:
///     `(codes, scales)`: flat uint8 codes (0 is zero, q ≥ 1 is 2^(lo + (q−1)·step)) and float32
///     `(lo, step)` pairs shaped `[ceil(numel / block), 2]`, on `fisher`'s device.
/// Raises:
///     ValueError: negative or non-finite values, a bad `block` or `range`.
///     TypeError: `fisher` not floating-point.
#[pyfunction]
pub fn fisher8_quantize(
    py: Python<'_>,
    fisher: PyTensor,
    block: usize,
    range: f64,
) -> PyResult<(PyTensor, PyTensor)> {
    let f = fisher.0;
    let (codes, scales) = py.allow_threads(move || fisher8::quantize(&f, block, range))?;
    Ok((PyTensor(codes), PyTensor(scales)))
}

/// The float32 values of 8-bit codes (flat), on their device.
///
/// Args:
///     codes: flat uint8 codes, contiguous.
///     scales: float32 `[ceil(len(codes) / block), 2]` scales on the codes' device, contiguous.
///     block: the block size they were made with.
/// Returns:
///     The flat float32 values.
/// Raises:
///     ValueError: scales of another shape or device, a bad `block`.
///     TypeError: codes not uint8 or not flat.
#[pyfunction]
pub fn fisher8_dequantize(
    py: Python<'_>,
    codes: PyTensor,
    scales: PyTensor,
    block: usize,
) -> PyResult<PyTensor> {
    let (c, s) = (codes.0, scales.0);
    let f = py.allow_threads(move || fisher8::dequantize(&c, &s, block))?;
    Ok(PyTensor(f))
}
