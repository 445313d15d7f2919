//! `ewc_rs._core`: the pymodule. What it exports is defined in `bindings` (typed boundary
//! types, GIL released around the heavy work); the engines live in `fisher`, `kfac`, `penalty`,
//! `fisher8`, `merge` and `summary`.

pub mod bindings;
pub mod compat;
pub mod cuda;
pub mod error;
pub mod fisher;
pub mod fisher8;
pub mod kfac;
pub mod memory;
pub mod merge;
pub mod penalty;
pub mod summary;

use bindings::cuda::{
    cuda_compile_check, cuda_kernel_set_enabled, cuda_kernel_status, cuda_set_nvrtc_dir,
};
use bindings::fisher::{layer_rule, registered_layers, FisherSums, LayerCall, LayerRule, RootSpec};
use bindings::fisher8::{fisher8_dequantize, fisher8_quantize};
use bindings::kfac::{KfacSums, KronPlan};
use bindings::merge::merge_tensor;
use bindings::penalty::{fused_penalty, penalty_add_to_grads};
use bindings::summary::fisher_summary;
use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION", compat::torch_version())?;
    m.add_class::<LayerRule>()?;
    m.add_class::<LayerCall>()?;
    m.add_class::<RootSpec>()?;
    m.add_class::<FisherSums>()?;
    m.add_class::<KfacSums>()?;
    m.add_class::<KronPlan>()?;
    m.add_function(wrap_pyfunction!(layer_rule, m)?)?;
    m.add_function(wrap_pyfunction!(registered_layers, m)?)?;
    m.add_function(wrap_pyfunction!(fused_penalty, m)?)?;
    m.add_function(wrap_pyfunction!(penalty_add_to_grads, m)?)?;
    m.add_function(wrap_pyfunction!(fisher8_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(fisher8_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(merge_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(fisher_summary, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_kernel_status, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_kernel_set_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_set_nvrtc_dir, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_check, m)?)?;
    Ok(())
}
