//! The penalty's one-pass CUDA kernel: one launch (one per 680 parameter tensors) reads θ, θ* and
//! F and writes the gradient, 16 bytes per float32 parameter (the memory floor), or adds it into
//! `.grad` (20, reading it too), and one small launch sums the value; both on torch's current
//! stream, without any host-device copy. F may be 8-bit codes (`crate::fisher8`), decoded in the
//! kernel.
//!
//! Nothing CUDA is needed to build it: the kernel (`penalty.cu`) is compiled at run time by
//! NVRTC, which torch's CUDA wheels ship, and the driver is reached through `cudarc`'s dynamic
//! loading. Where it cannot run (no NVRTC, an old GPU, switched off), `penalty` says so and the
//! caller uses the libtorch path; `status` tells which ran last (`ewc_rs.cuda_kernel.status()`).

mod kernels;
mod libs;
mod nvrtc;
pub mod table;

use crate::error::{Context, EwcError, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::Mutex;
pub use table::Target;
use tch::{Device, Kind, Tensor};

const UNUSED: u8 = 0;
const RAN: u8 = 1;
const FELL_BACK: u8 = 2;

/// What the last CUDA penalty used, on which GPU, and why it fell back (if it did).
static LAST: AtomicU8 = AtomicU8::new(UNUSED);
static LAST_ORDINAL: AtomicI32 = AtomicI32::new(0);
static REASON: Mutex<String> = Mutex::new(String::new());
/// 0: not read yet, 1: on, 2: off (from `EWC_RS_CUDA_KERNEL`, then `set_enabled`).
static ENABLED: AtomicU8 = AtomicU8::new(0);
/// A fallback reason not yet reported as a Python warning (reported once per process).
static WARNING: Mutex<Option<String>> = Mutex::new(None);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Whether the kernel is used (default: yes, unless `EWC_RS_CUDA_KERNEL=0`).
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let off = std::env::var("EWC_RS_CUDA_KERNEL")
                .is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false" | "no"));
            ENABLED.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
        v => v == 1,
    }
}

/// Switches the kernel on or off; returns the previous setting.
pub fn set_enabled(on: bool) -> bool {
    let before = enabled();
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    before
}

/// "unused", "kernel sm_90 cubin (NVRTC 13.0) on cuda:0", or "fallback on cuda:0: <reason>".
pub fn status() -> String {
    let ordinal = LAST_ORDINAL.load(Ordering::Relaxed);
    match LAST.load(Ordering::Relaxed) {
        RAN => match kernels::kernels(ordinal) {
            Ok(k) => format!("kernel {} on cuda:{ordinal}", k.label),
            Err(e) => format!("fallback on cuda:{ordinal}: {e}"),
        },
        FELL_BACK => format!(
            "fallback on cuda:{ordinal}: {}",
            REASON.lock().unwrap_or_else(|e| e.into_inner())
        ),
        _ => "unused".to_string(),
    }
}

/// The fallback reason to report as a warning, once per process.
pub fn take_warning() -> Option<String> {
    WARNING.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Where torch's libnvrtc lives (found by Python next to torch).
pub fn set_nvrtc_dir(dir: PathBuf) {
    libs::set_nvrtc_dir(dir);
}

/// Compiles the kernels for compute capability `cc` (e.g. 90), no GPU needed: a check of the
/// source. Returns what was made and its size in bytes.
pub fn compile_only(cc: i32, max_items: usize) -> Result<(String, usize)> {
    kernels::compile_only(cc, max_items).map_err(EwcError::Cuda)
}

fn fall_back(ordinal: i32, reason: String, warn: bool) -> Result<Option<Tensor>> {
    LAST_ORDINAL.store(ordinal, Ordering::Relaxed);
    LAST.store(FELL_BACK, Ordering::Relaxed);
    if warn && !WARNED.swap(true, Ordering::Relaxed) {
        *WARNING.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
    }
    *REASON.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    Ok(None)
}

/// F as the kernel reads it: a flat buffer of θ*'s dtype, or 8-bit codes (flat uint8) with the
/// float32 `(lo, step)` scales of blocks of `2^block_log2` values (see `crate::fisher8`).
#[derive(Clone, Copy)]
pub enum Fisher<'a> {
    Dense(&'a Tensor),
    Coded {
        codes: &'a Tensor,
        scales: &'a Tensor,
        block_log2: u32,
    },
}

/// The kernel variant (index into `kernels::NAMES`) for parameters of `param` dtype, θ* of
/// `storage` dtype, and F dense or 8-bit (`coded`).
fn variant(param: Kind, storage: Kind, coded: bool) -> Option<usize> {
    let p = match param {
        Kind::Float => 0,
        Kind::Half => 1,
        Kind::BFloat16 => 2,
        _ => return None,
    };
    let s = match storage {
        Kind::Float => 0,
        Kind::BFloat16 => 3,
        _ => return None,
    };
    Some(p + s + if coded { 6 } else { 0 })
}

/// Runs the one-pass penalty over `targets` on GPU `ordinal` with the flat θ* and F: gradients
/// `coef`·F·(θ−θ*) written or added as each target says, and returns the value (λ/2) Σ F (θ−θ*)²
/// as a 0-d float32 tensor on that GPU. `Ok(None)`: the kernel cannot run here (the caller falls
/// back; `status` says why).
///
/// # Safety
/// Each target's addresses must be live memory of `ordinal` holding `len` elements of `param`
/// dtype, its `offset + len` within `star` and F's buffer, its `block` plus its blocks within
/// the scales (8-bit F); no gradient target may overlap anything read or another target.
pub unsafe fn penalty(
    ordinal: i32,
    targets: &[Target],
    star: &Tensor,
    fisher: Fisher<'_>,
    param: Kind,
    coef: f32,
    lam: f64,
) -> Result<Option<Tensor>> {
    if !enabled() {
        let why = "switched off (ewc_rs.cuda_kernel.set_enabled(False) or EWC_RS_CUDA_KERNEL=0)";
        return fall_back(ordinal, why.to_string(), false);
    }
    let (f, scales, block_log2) = match fisher {
        Fisher::Dense(f) => {
            if f.kind() != star.kind() {
                return Err(EwcError::Type(format!(
                    "star/fisher: expected both float32 or both bfloat16, got {:?} and {:?}",
                    star.kind(),
                    f.kind()
                )));
            }
            (f, 0, 0)
        }
        Fisher::Coded {
            codes,
            scales,
            block_log2,
        } => (codes, scales.data_ptr() as u64, block_log2),
    };
    let coded = matches!(fisher, Fisher::Coded { .. });
    let Some(which) = variant(param, star.kind(), coded) else {
        return Err(EwcError::Type(format!(
            "params/star: expected float32, float16 or bfloat16 parameters and float32 or \
             bfloat16 storage, got {param:?} and {:?}",
            star.kind()
        )));
    };
    let k = match kernels::kernels(ordinal) {
        Ok(k) => k,
        Err(reason) => return fall_back(ordinal, reason, true),
    };
    let stream = match libs::current_stream(ordinal) {
        Ok(s) => s,
        Err(reason) => return fall_back(ordinal, reason, true),
    };
    let device = Device::Cuda(ordinal as usize);
    let (launches, partials) = k.plan(targets).map_err(EwcError::Cuda)?;
    if launches.is_empty() {
        let zero = Tensor::f_zeros([], (Kind::Float, device)).ctx("cuda penalty (value)")?;
        return Ok(Some(zero));
    }
    let value = Tensor::f_empty([], (Kind::Float, device)).ctx("cuda penalty (value)")?;
    let sums = Tensor::f_empty([partials as i64], (Kind::Double, device))
        .ctx("cuda penalty (partial sums)")?;
    let bufs = kernels::Buffers {
        star: star.data_ptr() as u64,
        fisher: f.data_ptr() as u64,
        partials: sums.data_ptr() as u64,
        value: value.data_ptr() as u64,
        scales,
        block_log2,
    };
    // SAFETY: the caller's contract for the targets; `star`, F's tensors, `sums` and `value` are
    // live tensors on this GPU, allocated on (or, for star and F, ready for) torch's current
    // stream, which runs the kernels: the allocator reuses `sums` only after them.
    unsafe { k.run(which, &launches, &bufs, coef, 0.5 * lam, stream) }.map_err(EwcError::Cuda)?;
    LAST_ORDINAL.store(ordinal, Ordering::Relaxed);
    LAST.store(RAN, Ordering::Relaxed);
    Ok(Some(value))
}

#[cfg(test)]
mod emulated;
#[cfg(test)]
mod tests;
