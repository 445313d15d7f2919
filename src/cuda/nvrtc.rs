//! Compiling `penalty.cu` at run time with NVRTC: to the GPU's own machine code (cubin) when this
//! NVRTC knows its architecture, else to PTX for the newest architecture it knows (the driver
//! then compiles that for the GPU).

use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CStr, CString};

/// The kernel's source, compiled into the extension.
pub const SOURCE: &str = include_str!("penalty.cu");

/// A compiled image for `cuModuleLoadData` (cubin, or NUL-terminated PTX) and what it is.
pub struct Image {
    pub bytes: Vec<u8>,
    /// e.g. "sm_90 cubin (NVRTC 13.0)".
    pub label: String,
}

fn nvrtc_error(what: &str, e: cudarc::nvrtc::result::NvrtcError) -> String {
    format!("NVRTC {what}: {e:?}")
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_error("version", e))?;
    Ok((major, minor))
}

/// The real architectures this NVRTC compiles for (e.g. 75, 80, 90).
fn supported_archs() -> Result<Vec<i32>, String> {
    let mut n = 0;
    // SAFETY: writes one int, then `n` ints into a buffer of that size.
    unsafe {
        sys::nvrtcGetNumSupportedArchs(&mut n)
            .result()
            .map_err(|e| nvrtc_error("supported architectures", e))?;
        let mut archs = vec![0i32; n.max(0) as usize];
        sys::nvrtcGetSupportedArchs(archs.as_mut_ptr())
            .result()
            .map_err(|e| nvrtc_error("supported architectures", e))?;
        Ok(archs)
    }
}

/// Compiles the kernels for compute capability `cc` (e.g. 90 for 9.0) with launch tables of
/// `max_items` items.
pub fn compile(cc: i32, max_items: usize) -> Result<Image, String> {
    let (major, minor) = version()?;
    let archs = supported_archs()?;
    let newest = archs.iter().copied().filter(|&a| a <= cc).max();
    let (target, cubin) = if archs.contains(&cc) {
        (format!("sm_{cc}"), true)
    } else if let Some(a) = newest {
        (format!("compute_{a}"), false)
    } else {
        return Err(format!(
            "NVRTC {major}.{minor} compiles for none of the architectures up to sm_{cc} \
             (it knows {archs:?})"
        ));
    };
    let options = [
        format!("--gpu-architecture={target}"),
        "-std=c++17".to_string(),
        format!("-DEWC_MAX_ITEMS={max_items}"),
    ];
    let src = CString::new(SOURCE).map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, Some(c"ewc_penalty.cu"))
        .map_err(|e| nvrtc_error("create program", e))?;
    // SAFETY: `prog` is live until destroyed at the end; the getters write into buffers of the
    // sizes NVRTC reported.
    let out = unsafe {
        let built = match result::compile_program(prog, &options) {
            Ok(()) => image(prog, cubin),
            Err(e) => Err(format!(
                "{}:\n{}",
                nvrtc_error("compile", e),
                text(&result::get_program_log(prog).unwrap_or_default())
            )),
        };
        let _ = result::destroy_program(prog);
        built
    };
    let kind = if cubin { "cubin" } else { "PTX" };
    out.map(|bytes| Image {
        bytes,
        label: format!("{target} {kind} (NVRTC {major}.{minor})"),
    })
}

/// The compiled program's cubin, or its PTX (NUL-terminated, as NVRTC gives it).
///
/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn image(prog: sys::nvrtcProgram, cubin: bool) -> Result<Vec<u8>, String> {
    if !cubin {
        let ptx = result::get_ptx(prog).map_err(|e| nvrtc_error("PTX", e))?;
        return Ok(ptx.into_iter().map(|c| c as u8).collect());
    }
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| nvrtc_error("cubin size", e))?;
    let mut bytes = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast::<c_char>())
        .result()
        .map_err(|e| nvrtc_error("cubin", e))?;
    Ok(bytes)
}

fn text(log: &[c_char]) -> String {
    let bytes: Vec<u8> = log.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}
