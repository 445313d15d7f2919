//! The libraries the kernel needs, found at run time so that nothing CUDA is needed at build time:
//! the driver (libcuda, which torch loaded when it initialised CUDA), NVRTC (shipped with torch's
//! CUDA wheels: found by its soname, or loaded from the folder that `ewc_rs` finds next to torch
//! and passes in, see `cuda_kernel.py`), and torch's current stream (from libtorch_cuda).

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The folder holding torch's libnvrtc, when Python found one.
static NVRTC_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Libraries loaded by path: kept loaded for the life of the process (NVRTC's functions are
/// looked up by soname afterwards and must stay valid).
static HELD: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// Remembers where torch's libnvrtc lives (used only if it is not found by its soname).
pub fn set_nvrtc_dir(dir: PathBuf) {
    *NVRTC_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
}

/// Whether the CUDA driver library can be loaded (it is, once torch has used a GPU).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Makes NVRTC loadable by its soname: already so, or loaded here from the folder Python found
/// (its builtins library first, which NVRTC itself opens by soname).
pub fn nvrtc_ready() -> Result<(), String> {
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let dir = NVRTC_DIR.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(dir) = dir else {
        return Err("NVRTC (libnvrtc) was not found on the loader path or next to torch".into());
    };
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    for prefix in ["libnvrtc-builtins.so", "libnvrtc.so"] {
        let path =
            library_in(&dir, prefix).ok_or_else(|| format!("no {prefix}* in {}", dir.display()))?;
        // SAFETY: NVRTC's libraries run no initialisation that could break this process.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        held.push(lib);
    }
    // SAFETY: as above.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(format!(
            "loaded NVRTC from {} but not found by its soname",
            dir.display()
        ))
    }
}

/// The versioned library `prefix.N...` in `dir` (not NVIDIA's `.alt.` variants).
fn library_in(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{prefix}.")) && !n.contains(".alt."))
        })
        .collect();
    found.sort();
    found.pop()
}

type GetStream = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;

/// torch's current CUDA stream for device `ordinal`, as a raw `CUstream`, through libtorch's
/// exported C shim `aoti_torch_get_current_cuda_stream` (tch has no stream API).
pub fn current_stream(ordinal: i32) -> Result<cudarc::driver::sys::CUstream, String> {
    static GET: OnceLock<Result<GetStream, String>> = OnceLock::new();
    let get = GET.get_or_init(|| {
        // SAFETY: RTLD_NOLOAD only finds libtorch_cuda if torch already loaded it; nothing runs.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some("libtorch_cuda.so"),
                libc::RTLD_NOLOAD | libc::RTLD_LAZY,
            )
        }
        .map_err(|e| format!("libtorch_cuda.so is not loaded: {e}"))?;
        // SAFETY: the symbol has this C signature in every torch line ewc_rs supports.
        let f = unsafe { lib.get::<GetStream>(b"aoti_torch_get_current_cuda_stream\0") }
            .map(|s| *s)
            .map_err(|e| {
                format!("libtorch_cuda.so has no aoti_torch_get_current_cuda_stream: {e}")
            })?;
        std::mem::forget(lib); // stays loaded with torch; the function pointer must stay valid
        Ok(f)
    });
    let get = get.as_ref().map_err(Clone::clone)?;
    let mut stream: *mut c_void = std::ptr::null_mut();
    // SAFETY: `get` is torch's function; it writes one pointer.
    let code = unsafe { get(ordinal, &mut stream) };
    if code != 0 {
        return Err(format!(
            "torch could not give its current stream on cuda:{ordinal}"
        ));
    }
    Ok(stream as cudarc::driver::sys::CUstream)
}
