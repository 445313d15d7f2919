//! What can be checked without a GPU: the launch tables' numbering and bytes, and (where torch's
//! libnvrtc is found) that NVRTC compiles the kernel source for the architectures we target.

use super::table::{self, launches, table_bytes, Pointers, Target, TILE};
use super::*;

fn target(param: u64, len: u64, offset: u64, add: bool) -> Target {
    Target {
        param,
        grad: param + 1_000_000,
        offset,
        len,
        block: offset / 16,
        add,
    }
}

#[test]
fn tiles_are_numbered_across_items_and_empty_tensors_skipped() {
    let lens = [10, 0, TILE, TILE + 1, 3 * TILE];
    let mut offset = 0;
    let targets: Vec<Target> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let t = target(1000 * i as u64, n, offset, i % 2 == 0);
            offset += n;
            t
        })
        .collect();
    let out = launches(&targets, 768).unwrap();
    assert_eq!(out.len(), 1);
    let items = &out[0].items;
    assert_eq!(items.len(), 4, "the empty tensor has no item");
    let firsts: Vec<u32> = items.iter().map(|i| i.first_tile).collect();
    assert_eq!(firsts, vec![0, 1, 2, 4]);
    assert_eq!(out[0].tiles, 7);
    assert_eq!(items[2].offset, 10 + TILE);
    assert_eq!(items[2].add, 0);
    assert_eq!(items[3].add, 1);
}

#[test]
fn launches_split_at_the_table_size() {
    let targets: Vec<Target> = (0..10).map(|i| target(64 * i, 5, 5 * i, false)).collect();
    let out = launches(&targets, 4).unwrap();
    let sizes: Vec<usize> = out.iter().map(|l| l.items.len()).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    for l in &out {
        assert_eq!(
            l.items[0].first_tile, 0,
            "each launch numbers its own tiles"
        );
        assert_eq!(l.tiles as usize, l.items.len());
    }
    assert_eq!(out[2].items[1].offset, 45);
}

#[test]
fn a_table_has_the_layout_of_the_kernels_struct() {
    let targets = [target(0x1111, 7, 3, true), target(0x2222, 9, 32, false)];
    let launch = &launches(&targets, 8).unwrap()[0];
    let at = Pointers {
        star: 0xA,
        fisher: 0xB,
        partials: 0xC,
        scales: 0xD,
        block_log2: 6,
    };
    let bytes = table_bytes(launch, at, 2.5, 8);
    assert_eq!(bytes.len(), table::table_size(8));
    assert_eq!(bytes.len(), 48 + 48 * 8);
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
    assert_eq!(
        (u64_at(0), u64_at(8), u64_at(16), u64_at(24)),
        (0xA, 0xB, 0xC, 0xD)
    );
    assert_eq!(f32::from_ne_bytes(bytes[32..36].try_into().unwrap()), 2.5);
    assert_eq!(
        (u32_at(36), u32_at(40), u32_at(44)),
        (2, 2, 6),
        "count, tiles, block_log2"
    );
    // item 1 at 48 + 48: param, grad, offset, len, block, first_tile, add
    let at = 96;
    assert_eq!(u64_at(at), 0x2222);
    assert_eq!(u64_at(at + 8), 0x2222 + 1_000_000);
    assert_eq!((u64_at(at + 16), u64_at(at + 24)), (32, 9));
    assert_eq!(u64_at(at + 32), 2, "first scale block");
    assert_eq!((u32_at(at + 40), u32_at(at + 44)), (1, 0));
    assert!(
        bytes[144..].iter().all(|&b| b == 0),
        "unused items are zero"
    );
}

#[test]
fn the_largest_tables_fit_the_kernel_parameter_limits() {
    use super::kernels::{ITEMS_LARGE, ITEMS_SMALL};
    assert!(
        table::table_size(ITEMS_LARGE) <= 32_764,
        "CUDA 12.1+ drivers"
    );
    assert!(table::table_size(ITEMS_SMALL) <= 4_096, "older drivers");
}

#[test]
fn switching_off_is_remembered_and_reported() {
    let before = set_enabled(false);
    assert!(!enabled());
    assert!(!set_enabled(before));
    assert_eq!(enabled(), before);
}

/// torch's NVRTC folder, found from the torch lib folder on LD_LIBRARY_PATH (as `cargo test` is
/// run, see the Makefile): `<site-packages>/nvidia/<cu13|cuda_nvrtc>/lib`.
fn torch_nvrtc_dir() -> Option<std::path::PathBuf> {
    let paths = std::env::var("LD_LIBRARY_PATH").ok()?;
    let torch_lib = std::env::split_paths(&paths).find(|p| p.ends_with("torch/lib"))?;
    let nvidia = torch_lib.parent()?.parent()?.join("nvidia");
    std::fs::read_dir(nvidia)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("lib")))
        .find(|lib| {
            std::fs::read_dir(lib).is_ok_and(|mut d| {
                d.any(|e| {
                    e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so."))
                })
            })
        })
}

#[test]
fn nvrtc_compiles_the_kernel_for_each_target_architecture() {
    let Some(dir) = torch_nvrtc_dir() else {
        eprintln!("skipped: no libnvrtc next to torch (a CPU-only torch build)");
        return;
    };
    set_nvrtc_dir(dir);
    for cc in [75, 80, 90] {
        for max_items in [super::kernels::ITEMS_SMALL, super::kernels::ITEMS_LARGE] {
            let (label, size) = compile_only(cc, max_items).unwrap_or_else(|e| panic!("{e}"));
            assert!(label.starts_with(&format!("sm_{cc} cubin")), "{label}");
            assert!(size > 1000, "{label}: {size} bytes");
        }
    }
    // An architecture newer than this NVRTC knows gets PTX for the newest one it knows.
    let (label, _) = compile_only(990, super::kernels::ITEMS_LARGE).unwrap();
    assert!(label.contains("PTX"), "{label}");
}
