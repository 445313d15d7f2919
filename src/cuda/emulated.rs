//! The kernel's own source, run on the CPU: `emulation/harness.cpp` compiles `penalty.cu` with host
//! stand-ins for the CUDA built-ins (threads and barriers for a block's threads and warps), and
//! these tests drive it through the same launch tables and loop as the GPU path, against a float64
//! reference, for every dtype pair, both ways of writing the gradient, dense and 8-bit F, several
//! launches and blocks that walk several tiles. Needs a C++20 compiler (`c++`, or `CXX`); says so and returns without.

use super::kernels::{each_launch, grid, Buffers};
use super::table::{launches, Target};
use super::{variant, Fisher};
use crate::fisher8;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Items per launch table in the emulated build: small, so a handful of tensors takes several.
const MAX_ITEMS: usize = 4;
/// Multiprocessors of the pretend GPU: 8 blocks a launch, fewer than its tiles.
const SMS: u32 = 1;

type Penalty = unsafe extern "C" fn(i32, *const c_void, u32) -> i32;
type Finish = unsafe extern "C" fn(*const f64, u32, f64, *mut f32);

/// The harness, compiled once per test process; None when there is no C++ compiler.
fn emulator() -> Option<&'static libloading::Library> {
    static LIB: OnceLock<Option<libloading::Library>> = OnceLock::new();
    LIB.get_or_init(|| {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if std::process::Command::new(&cxx)
            .arg("--version")
            .output()
            .is_err()
        {
            return None;
        }
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file!());
        let source = here.parent().unwrap().join("emulation/harness.cpp");
        let dir = std::env::temp_dir().join(format!("ewc_rs_emulated_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("harness.so");
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"])
            .arg(format!("-DEWC_MAX_ITEMS={MAX_ITEMS}"))
            .arg(&source)
            .arg("-o")
            .arg(&lib)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "compiling {} failed:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: our harness; its initialisers only set plain globals.
        Some(unsafe { libloading::Library::new(&lib) }.unwrap())
    })
    .as_ref()
}

/// Runs the emulated pass like `cuda::penalty` does on a GPU; returns the value.
fn run(
    lib: &libloading::Library,
    targets: &[Target],
    star: &Tensor,
    fisher: Fisher<'_>,
    param: Kind,
    coef: f32,
    lam: f64,
) -> f32 {
    // SAFETY: symbols of the harness with these signatures.
    let (penalty, finish) = unsafe {
        (
            *lib.get::<Penalty>(b"ewc_emulate_penalty\0").unwrap(),
            *lib.get::<Finish>(b"ewc_emulate_finish\0").unwrap(),
        )
    };
    let (f, scales, block_log2, coded) = match fisher {
        Fisher::Dense(f) => (f, 0, 0, false),
        Fisher::Coded {
            codes,
            scales,
            block_log2,
        } => (codes, scales.data_ptr() as u64, block_log2, true),
    };
    let which = variant(param, star.kind(), coded).unwrap() as i32;
    let launches = launches(targets, MAX_ITEMS).unwrap();
    let needed: u32 = launches.iter().map(|l| grid(l.tiles, SMS)).sum();
    let partials = vec![f64::NAN; needed as usize];
    let mut value = f32::NAN;
    let bufs = Buffers {
        star: star.data_ptr() as u64,
        fisher: f.data_ptr() as u64,
        partials: partials.as_ptr() as u64,
        value: 0,
        scales,
        block_log2,
    };
    let grid_of = |tiles| grid(tiles, SMS);
    let written = each_launch(&launches, &bufs, coef, MAX_ITEMS, grid_of, |bytes, g| {
        // SAFETY: the table holds host addresses of live tensors and of `partials`.
        match unsafe { penalty(which, bytes.as_ptr().cast(), g) } {
            0 => Ok(()),
            e => Err(format!("emulated launch failed: {e}")),
        }
    })
    .unwrap();
    assert_eq!(written, needed);
    // SAFETY: `partials` holds `written` doubles.
    unsafe { finish(partials.as_ptr(), written, 0.5 * lam, &mut value) };
    value
}

const SHAPES: [&[i64]; 9] = [
    &[3, 5],
    &[0],
    &[2048],
    &[2049],
    &[7],
    &[20_000],
    &[1],
    &[64, 3, 3],
    &[5000],
];

fn tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Float => 1e-6,
        Kind::Half => 1e-3,
        _ => 8e-3,
    }
}

fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    let scale = want.abs().max().double_value(&[]).max(1e-30);
    (got.to_kind(Kind::Double) - want)
        .abs()
        .max()
        .double_value(&[])
        / scale
}

#[test]
fn the_kernel_source_run_on_the_cpu_matches_the_reference() {
    let Some(lib) = emulator() else {
        eprintln!("skipped: no C++ compiler (c++ or CXX) to build the emulation harness");
        return;
    };
    tch::manual_seed(7);
    let pairs = [
        (Kind::Float, Kind::Float),
        (Kind::Half, Kind::Float),
        (Kind::BFloat16, Kind::Float),
        (Kind::Float, Kind::BFloat16),
        (Kind::Half, Kind::BFloat16),
        (Kind::BFloat16, Kind::BFloat16),
    ];
    for ((param, storage), coded) in pairs.iter().flat_map(|&p| [(p, false), (p, true)]) {
        for add in [false, true] {
            let what =
                format!("{param:?} parameters, {storage:?} storage, 8-bit F={coded}, add={add}");
            let params: Vec<Tensor> = SHAPES
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)).to_kind(param))
                .collect();
            let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
            let flat = Tensor::cat(
                &params.iter().map(|p| p.reshape([-1])).collect::<Vec<_>>(),
                0,
            );
            let star = (flat.to_kind(Kind::Float)
                + Tensor::randn([total], (Kind::Float, Device::Cpu)) * 0.1)
                .to_kind(storage);
            // Dense F in [0, 1); 8-bit F spanning ~20 binades (below float16 overflow), coded per parameter in blocks
            // of 64 (short last blocks), and the reference reads what the codes decode to.
            let (fisher, codes, scales) = if coded {
                let wide = (Tensor::randn([total], (Kind::Float, Device::Cpu)) * 3.0).exp() * 1e-3;
                let (mut codes, mut scales, mut at) = (Vec::new(), Vec::new(), 0i64);
                for p in &params {
                    let n = p.numel() as i64;
                    let (c, s) = fisher8::quantize(&wide.narrow(0, at, n), 64, 24.0).unwrap();
                    codes.push(c);
                    scales.push(s);
                    at += n;
                }
                let (codes, scales) = (Tensor::cat(&codes, 0), Tensor::cat(&scales, 0));
                let decoded: Vec<Tensor> = {
                    let (mut at, mut first, mut out) = (0i64, 0i64, Vec::new());
                    for p in &params {
                        let (n, nb) = (p.numel() as i64, fisher8::blocks(p.numel(), 64) as i64);
                        let (c, s) = (codes.narrow(0, at, n), scales.narrow(0, first, nb));
                        out.push(fisher8::dequantize(&c, &s, 64).unwrap());
                        (at, first) = (at + n, first + nb);
                    }
                    out
                };
                (Tensor::cat(&decoded, 0), Some(codes), Some(scales))
            } else {
                let f = Tensor::rand([total], (Kind::Float, Device::Cpu)).to_kind(storage);
                (f, None, None)
            };
            let before = Tensor::randn([total], (Kind::Float, Device::Cpu)).to_kind(param);
            let grads = if add {
                before.copy()
            } else {
                Tensor::full([total], f64::NAN, (param, Device::Cpu))
            };
            let elt = param.elt_size_in_bytes() as u64;
            let (mut offset, mut block) = (0u64, 0u64);
            let targets: Vec<Target> = params
                .iter()
                .map(|p| {
                    let t = Target {
                        param: p.data_ptr() as u64,
                        grad: grads.data_ptr() as u64 + offset * elt,
                        offset,
                        len: p.numel() as u64,
                        block,
                        add,
                    };
                    offset += p.numel() as u64;
                    block += fisher8::blocks(p.numel(), 64) as u64;
                    t
                })
                .collect();
            let (lam, coef) = (3.0, 1.5f32);
            let f = match (&codes, &scales) {
                (Some(codes), Some(scales)) => Fisher::Coded {
                    codes,
                    scales,
                    block_log2: 6,
                },
                _ => Fisher::Dense(&fisher),
            };
            let value = run(lib, &targets, &star, f, param, coef, lam);
            let d = flat.to_kind(Kind::Double) - star.to_kind(Kind::Double);
            let f = fisher.to_kind(Kind::Double);
            let want = (&f * &d * &d).sum(Kind::Double).double_value(&[]) * 0.5 * lam;
            assert!(
                ((value as f64) - want).abs() <= 1e-5 * want.abs(),
                "{what}: value {value} vs {want}"
            );
            let mut expect = &f * &d * coef as f64;
            if add {
                expect += before.to_kind(Kind::Double);
            }
            let err = max_rel(&grads, &expect);
            assert!(err <= tolerance(param), "{what}: gradient error {err}");
        }
    }
}
