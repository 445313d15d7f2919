//! The compiled kernels of one GPU (loaded once, into torch's context: the device's primary
//! context) and their launches on torch's current stream.

use super::table::{self, Target, BLOCK};
use super::{libs, nvrtc};
use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys::{self, CUdevice_attribute as Attr};
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

/// Penalty kernels by (parameter dtype, storage dtype, F dense or 8-bit), as named in penalty.cu.
pub const NAMES: [&str; 12] = [
    "ewc_penalty_f32_f32",
    "ewc_penalty_f16_f32",
    "ewc_penalty_bf16_f32",
    "ewc_penalty_f32_bf16",
    "ewc_penalty_f16_bf16",
    "ewc_penalty_bf16_bf16",
    "ewc_penalty_f32_f32_q8",
    "ewc_penalty_f16_f32_q8",
    "ewc_penalty_bf16_f32_q8",
    "ewc_penalty_f32_bf16_q8",
    "ewc_penalty_f16_bf16_q8",
    "ewc_penalty_bf16_bf16_q8",
];

/// Items per launch table: the table is the kernel's parameter, up to 32 764 bytes from CUDA
/// 12.1 drivers on (4 096 before); 48 bytes of header and 48 an item.
pub(super) const ITEMS_LARGE: usize = 680;
pub(super) const ITEMS_SMALL: usize = 84;
/// Resident blocks aimed for per multiprocessor (256 threads each).
const BLOCKS_PER_SM: u32 = 8;

/// One GPU's loaded kernels.
pub struct Kernels {
    ctx: sys::CUcontext,
    penalty: [sys::CUfunction; 12],
    finish: sys::CUfunction,
    max_items: usize,
    sms: u32,
    /// What was compiled, e.g. "sm_90 cubin (NVRTC 13.0)".
    pub label: String,
}

// SAFETY: context and function handles are process-wide driver objects, usable from any thread.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

fn driver(what: &str, e: DriverError) -> String {
    format!("CUDA driver, {what}: {e}")
}

/// A GPU's kernels, or why they cannot run there.
type Loaded = Result<Arc<Kernels>, String>;

/// The kernels of GPU `ordinal`, compiled and loaded on first use; an error (the reason the
/// kernel cannot run there) is remembered too, so it is not retried on every step.
pub fn kernels(ordinal: i32) -> Loaded {
    static LOADED: Mutex<Vec<(i32, Loaded)>> = Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = loaded.iter().find(|(o, _)| *o == ordinal) {
        return k.clone();
    }
    let k = load(ordinal).map(Arc::new);
    loaded.push((ordinal, k.clone()));
    k
}

fn load(ordinal: i32) -> Result<Kernels, String> {
    if !libs::driver_present() {
        return Err("the CUDA driver library (libcuda) is not loadable".into());
    }
    libs::nvrtc_ready()?;
    cu::init().map_err(|e| driver("init", e))?;
    let dev = cu::device::get(ordinal).map_err(|e| driver("device", e))?;
    // SAFETY: `dev` came from `device::get`.
    let attr = |a: Attr| unsafe { cu::device::get_attribute(dev, a) };
    let major = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(|e| driver("compute capability", e))?;
    let minor = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .map_err(|e| driver("compute capability", e))?;
    let sms = attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver("multiprocessor count", e))?;
    if major < 7 {
        return Err(format!(
            "compute capability {major}.{minor} is below 7.0 (the kernel reads its table in place)"
        ));
    }
    let mut version = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| driver("version", e))?;
    let max_items = if version >= 12010 {
        ITEMS_LARGE
    } else {
        ITEMS_SMALL
    };
    let image = nvrtc::compile(major * 10 + minor, max_items)?;
    // SAFETY: the primary context is the one torch's runtime uses on this device; retained here
    // for the life of the process (never released, like the module loaded into it).
    let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(|e| driver("context", e))?;
    within(ctx, || {
        // SAFETY: `image` is a cubin or NUL-terminated PTX made by NVRTC.
        let module = unsafe { cu::module::load_data(image.bytes.as_ptr().cast()) }
            .map_err(|e| driver("load module", e))?;
        let function = |name: &str| {
            let c = CString::new(name).expect("kernel names have no NUL");
            // SAFETY: `module` was just loaded and is never unloaded.
            unsafe { cu::module::get_function(module, c) }.map_err(|e| driver(name, e))
        };
        let mut penalty = [std::ptr::null_mut(); 12];
        for (slot, name) in penalty.iter_mut().zip(NAMES) {
            *slot = function(name)?;
        }
        Ok(Kernels {
            ctx,
            penalty,
            finish: function("ewc_penalty_finish")?,
            max_items,
            sms: sms.max(1) as u32,
            label: image.label.clone(),
        })
    })
}

/// Runs `f` with `ctx` current on this thread, then restores the context that was current.
fn within<T>(ctx: sys::CUcontext, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let before = cu::ctx::get_current().map_err(|e| driver("current context", e))?;
    if before != Some(ctx) {
        // SAFETY: `ctx` is a retained primary context.
        unsafe { cu::ctx::set_current(ctx) }.map_err(|e| driver("set context", e))?;
    }
    let out = f();
    if let Some(prev) = before.filter(|&p| p != ctx) {
        // SAFETY: `prev` was current on this thread a moment ago.
        unsafe { cu::ctx::set_current(prev) }.map_err(|e| driver("restore context", e))?;
    }
    out
}

/// Device buffers of one pass: flat θ*, flat F (or its 8-bit codes), the per-block partial sums
/// (doubles, as many as [`Kernels::plan`] counts), the 0-d float32 value, and 8-bit F's scales
/// (0 for a dense F) with log₂ of its block size.
pub struct Buffers {
    pub star: u64,
    pub fisher: u64,
    pub partials: u64,
    pub value: u64,
    pub scales: u64,
    pub block_log2: u32,
}

/// Blocks of one launch over `tiles` tiles on a GPU of `sms` multiprocessors.
pub(super) fn grid(tiles: u32, sms: u32) -> u32 {
    tiles.min(sms * BLOCKS_PER_SM).max(1)
}

/// Hands each launch's table (its partial sums at the next free slots of `bufs.partials`) and grid
/// to `launch`; returns how many partial sums the launches write. Shared by the GPU path and the
/// CPU run of the kernel's source in the tests.
pub(super) fn each_launch(
    launches: &[table::Launch],
    bufs: &Buffers,
    coef: f32,
    max_items: usize,
    grid_of: impl Fn(u32) -> u32,
    mut launch: impl FnMut(&mut [u8], u32) -> Result<(), String>,
) -> Result<u32, String> {
    let mut written = 0u64;
    for l in launches {
        let grid = grid_of(l.tiles);
        let at = table::Pointers {
            star: bufs.star,
            fisher: bufs.fisher,
            partials: bufs.partials + 8 * written,
            scales: bufs.scales,
            block_log2: bufs.block_log2,
        };
        let mut bytes = table::table_bytes(l, at, coef, max_items);
        launch(&mut bytes, grid)?;
        written += grid as u64;
    }
    Ok(written as u32)
}

impl Kernels {
    /// The launches over `targets`, and the number of partial sums they write.
    pub fn plan(&self, targets: &[Target]) -> Result<(Vec<table::Launch>, usize), String> {
        let launches = table::launches(targets, self.max_items)
            .ok_or("a parameter tensor has more than 4·10¹² elements")?;
        let partials = launches
            .iter()
            .map(|l| grid(l.tiles, self.sms) as usize)
            .sum();
        Ok((launches, partials))
    }

    /// Launches the pass on `stream`: kernel `variant` (index into [`NAMES`]) for each launch,
    /// then the reduction writing `half_lam` × Σ F d² to `bufs.value`.
    ///
    /// # Safety
    /// Every address in `launches` and `bufs` must be device memory of the kernel's dtypes, live
    /// until the stream has run the kernels; gradient targets must not overlap what is read.
    pub unsafe fn run(
        &self,
        variant: usize,
        launches: &[table::Launch],
        bufs: &Buffers,
        coef: f32,
        half_lam: f64,
        stream: sys::CUstream,
    ) -> Result<(), String> {
        within(self.ctx, || {
            let grid_of = |tiles| grid(tiles, self.sms);
            let written =
                each_launch(launches, bufs, coef, self.max_items, grid_of, |bytes, g| {
                    let mut params = [bytes.as_mut_ptr().cast::<c_void>()];
                    // SAFETY: the caller's contract; `params` points at one `struct Table`, which the
                    // driver copies before returning.
                    unsafe {
                        cu::launch_kernel(
                            self.penalty[variant],
                            (g, 1, 1),
                            (BLOCK, 1, 1),
                            0,
                            stream,
                            &mut params,
                        )
                    }
                    .map_err(|e| driver("launch penalty", e))
                })?;
            let (mut partials, mut n, mut scale, mut value) =
                (bufs.partials, written, half_lam, bufs.value);
            let mut params = [
                (&mut partials as *mut u64).cast::<c_void>(),
                (&mut n as *mut u32).cast(),
                (&mut scale as *mut f64).cast(),
                (&mut value as *mut u64).cast(),
            ];
            // SAFETY: the four arguments match `ewc_penalty_finish`'s; `partials` holds `n`
            // doubles written by the launches above, on the same stream.
            unsafe {
                cu::launch_kernel(
                    self.finish,
                    (1, 1, 1),
                    (BLOCK, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            }
            .map_err(|e| driver("launch reduction", e))
        })
    }
}

/// Compiles the kernels for compute capability `cc` without a GPU (a check of the source):
/// returns the image's label and size.
pub fn compile_only(cc: i32, max_items: usize) -> Result<(String, usize), String> {
    libs::nvrtc_ready()?;
    let image = nvrtc::compile(cc, max_items)?;
    Ok((image.label, image.bytes.len()))
}
