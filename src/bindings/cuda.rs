//! The CUDA kernel's switches and state, for `ewc_rs.cuda_kernel` (the penalty entry points in
//! `bindings::penalty` use the kernel by themselves).

use crate::cuda;
use pyo3::exceptions::PyRuntimeWarning;
use pyo3::prelude::*;
use std::ffi::CString;
use std::path::PathBuf;

/// What the last CUDA penalty ran: "unused", "kernel <image> on cuda:N" or
/// "fallback on cuda:N: <reason>".
#[pyfunction]
pub fn cuda_kernel_status() -> String {
    cuda::status()
}

/// Switches the one-pass CUDA kernel on or off (off: the libtorch path); returns the previous
/// setting.
#[pyfunction]
pub fn cuda_kernel_set_enabled(on: bool) -> bool {
    cuda::set_enabled(on)
}

/// Tells the kernel where torch's libnvrtc lives (used when it is not found by its soname).
#[pyfunction]
pub fn cuda_set_nvrtc_dir(path: PathBuf) {
    cuda::set_nvrtc_dir(path);
}

/// Compiles the kernel source with NVRTC for compute capability `cc` (e.g. 90), no GPU needed.
///
/// Args:
///     cc: compute capability × 10 + minor (75, 80, 90, ...).
///     max_items: launch-table size the kernels are built for.
/// Returns:
///     `(what, size)`: e.g. `("sm_90 cubin (NVRTC 13.0)", 31744)`.
#[pyfunction]
#[pyo3(signature = (cc, max_items=680))]
pub fn cuda_compile_check(py: Python<'_>, cc: i32, max_items: usize) -> PyResult<(String, usize)> {
    Ok(py.allow_threads(|| cuda::compile_only(cc, max_items))?)
}

/// Reports, once per process, that CUDA penalties fall back to the libtorch path, and why.
pub fn warn_if_fell_back(py: Python<'_>) -> PyResult<()> {
    if let Some(reason) = cuda::take_warning() {
        let msg = format!(
            "ewc_rs: the one-pass CUDA penalty kernel cannot run ({reason}); using the slower \
             libtorch path (ewc_rs.cuda_kernel.status() tells which ran)"
        );
        let msg = CString::new(msg.replace('\0', " ")).expect("NULs replaced");
        PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &msg, 1)?;
    }
    Ok(())
}
