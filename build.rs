//! Exports the torch version the extension is built for (`EWC_RS_TORCH_VERSION`), read from its
//! one source, `python/ewc_rs/_torch_version.py` (which the Python package checks at import).

fn main() {
    let path = "python/ewc_rs/_torch_version.py";
    println!("cargo:rerun-if-changed={path}");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("TORCH_VERSION = \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{path}: no line `TORCH_VERSION = \"X.Y.Z\"`"));
    println!("cargo:rustc-env=EWC_RS_TORCH_VERSION={version}");
}
