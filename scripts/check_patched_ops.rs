// Checks at run time the four torch-sys wrappers scripts/patch_torch_sys.py rewrites (cholesky,
// cholesky_out, qr, qr_out -> linalg_cholesky, linalg_qr): results, triangularity, shapes, _out forms.
// Not part of the build. Run it in a patched line's venv (here 2.14, after `make test-core TORCH=2.14`):
//   mkdir -p build-torch-2.14/examples && cp scripts/check_patched_ops.rs build-torch-2.14/examples/
//   V=~/.cache/ewc_rs/venv-torch2.14.0; env VIRTUAL_ENV=$V PATH=$V/bin:$PATH \
//     CARGO_TARGET_DIR=~/.cache/ewc_rs/target-torch2.14.0 LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 \
//     LD_LIBRARY_PATH=$V/lib/python3.11/site-packages/torch/lib cargo run --release --example check_patched_ops \
//     --manifest-path build-torch-2.14/Cargo.toml --features pyo3/extension-module
//   rm -r build-torch-2.14/examples
use tch::{Device, Kind, Tensor};
fn main() {
    tch::manual_seed(7);
    let a = Tensor::randn([5, 5], (Kind::Double, Device::Cpu));
    let spd = a.matmul(&a.transpose(0, 1)) + Tensor::eye(5, (Kind::Double, Device::Cpu));
    for upper in [false, true] {
        let c = spd.cholesky(upper);
        let back = if upper {
            c.transpose(0, 1).matmul(&c)
        } else {
            c.matmul(&c.transpose(0, 1))
        };
        let err = (back - &spd).abs().max().double_value(&[]);
        let tri = if upper { c.triu(0) } else { c.tril(0) };
        let tri_err = (&c - tri).abs().max().double_value(&[]);
        let out = Tensor::empty([5, 5], (Kind::Double, Device::Cpu));
        let c2 = spd.cholesky_out(&out, upper);
        let out_err = (&c2 - &c).abs().max().double_value(&[]);
        println!(
            "cholesky upper={upper}: reconstruct {err:e}, triangular {tri_err:e}, _out {out_err:e}"
        );
        assert!(err < 1e-10 && tri_err == 0.0 && out_err == 0.0);
    }
    let m = Tensor::randn([6, 4], (Kind::Double, Device::Cpu));
    for some in [true, false] {
        let (q, r) = m.qr(some);
        let err = (q.matmul(&r) - &m).abs().max().double_value(&[]);
        println!(
            "qr some={some}: Q {:?} R {:?}, reconstruct {err:e}",
            q.size(),
            r.size()
        );
        let want_q = if some { vec![6, 4] } else { vec![6, 6] };
        assert!(err < 1e-10 && q.size() == want_q);
        let (qo, ro) = (
            Tensor::empty([0], (Kind::Double, Device::Cpu)),
            Tensor::empty([0], (Kind::Double, Device::Cpu)),
        );
        let (q2, r2) = m.qr_q(&qo, &ro, some);
        let out_err =
            (q2 - &q).abs().max().double_value(&[]) + (r2 - &r).abs().max().double_value(&[]);
        println!("qr_q some={some}: _out {out_err:e}");
        assert!(out_err == 0.0);
    }
    println!("ok");
}
