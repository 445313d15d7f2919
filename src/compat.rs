//! Differences between the torch lines ewc_rs builds for, in one place.
//!
//! Each line has its own manifest (the root `Cargo.toml` for the default line, torch 2.11 / tch 0.24;
//! `build-torch-X.Y/Cargo.toml` for the others) that picks the `tch`/`torch-sys`/`pyo3-tch` release
//! made for it; `build.rs` sets `cfg(torch_X_Y)` for the torch actually linked. The tch APIs this
//! crate uses are the same in tch 0.22, 0.23, 0.24 and 0.26 (only generated ops for new torch
//! operators were added or removed), so there is nothing to bridge yet: code that has to differ per
//! line goes here, behind those cfg flags, and nowhere else.

/// The torch release this extension was compiled and linked against ("2.13.0"): torch-sys's
/// libtorch, as read by `build.rs`.
pub const TORCH_VERSION: &str = env!("EWC_RS_TORCH_VERSION");

/// [`TORCH_VERSION`] inside a marker that `ewc_rs/__init__.py` looks for in the extension's file
/// before loading it: an extension built for another libtorch may fail to load, or crash, rather
/// than say which torch it needs. Keep the two spellings in step (`_native.py` and the test below).
const MARKER: &str = concat!("ewc_rs built for torch ", env!("EWC_RS_TORCH_VERSION"), ";");

/// The torch version the extension exports (`ewc_rs._core.TORCH_VERSION`), read from the marker so
/// that the marker is in the binary (`black_box`: not folded away).
pub fn torch_version() -> &'static str {
    let marker = std::hint::black_box(MARKER);
    marker
        .strip_prefix("ewc_rs built for torch ")
        .and_then(|v| v.strip_suffix(';'))
        .unwrap_or(marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_holds_the_linked_version() {
        assert_eq!(torch_version(), TORCH_VERSION);
        assert!(
            TORCH_VERSION.split('.').count() == 3 && !TORCH_VERSION.contains('+'),
            "{TORCH_VERSION}"
        );
    }
}
