//! Exports the version of the torch this build links (`EWC_RS_TORCH_VERSION`, e.g. "2.13.0") and
//! a cfg flag for its line (`torch_2_13`), for `src/compat.rs`. The version is the one torch-sys
//! found and linked: read from the torch package next to its `lib/` (`torch/version.py`), or from a
//! standalone libtorch's `build-version`. Every manifest (the root one, the default line, and
//! `build-torch-*/Cargo.toml`) uses this script.

use std::path::Path;

/// Torch lines that may appear as `cfg(torch_X_Y)`; `src/compat.rs` is the only place using them.
const LINES: [&str; 7] = ["2_9", "2_10", "2_11", "2_12", "2_13", "2_14", "2_15"];

fn main() {
    // torch-sys (`links = "tch"`) passes the libtorch lib dir it linked as DEP_TCH_LIBTORCH_LIB.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB");
    let version = torch_version(Path::new(&lib));
    let release = version.split('+').next().unwrap_or(&version).to_owned();
    let line: Vec<&str> = release.split('.').take(2).collect();
    let cfg = format!("torch_{}", line.join("_"));
    println!(
        "cargo:rustc-check-cfg=cfg(torch_{})",
        LINES.join(", torch_")
    );
    println!("cargo:rustc-cfg={cfg}");
    println!("cargo:rustc-env=EWC_RS_TORCH_VERSION={release}");
}

/// The version string of the libtorch in `lib` (its parent is the torch package or libtorch dir).
fn torch_version(lib: &Path) -> String {
    let root = lib.parent().unwrap_or(lib);
    let version_py = root.join("version.py");
    let build_version = root.join("build-version");
    for path in [&version_py, &build_version] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if let Ok(text) = std::fs::read_to_string(&version_py) {
        // torch/version.py: `__version__ = '2.13.0+cu130'`
        let found = text.lines().find_map(|l| {
            let rest = l
                .strip_prefix("__version__")?
                .trim_start()
                .strip_prefix('=')?
                .trim();
            Some(rest.trim_matches(|c| c == '\'' || c == '"').to_owned())
        });
        if let Some(v) = found {
            return v;
        }
    }
    if let Ok(text) = std::fs::read_to_string(&build_version) {
        return text.trim().to_owned();
    }
    panic!(
        "no torch version next to libtorch's {}: neither {} nor {}",
        lib.display(),
        version_py.display(),
        build_version.display()
    )
}
