//! The fused EWC penalty: P = (λ/2) Σ_i F_i (θ_i − θ*_i)² and its gradient λ F_i (θ_i − θ*_i),
//! for all parameters together in one pass.
//!
//! θ* and F live in two flat buffers (built once per consolidation); the parameters stay where
//! the model keeps them. On CPU one multi-threaded loop reads θ, θ*, F and writes the flat
//! gradient (16 bytes per float32 parameter, the memory floor). On other devices a fixed handful
//! of libtorch kernels runs over the flat buffers, however many parameter tensors there are.

use crate::error::{value_err, Context, EwcError, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements per parallel work item: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

/// Result of one penalty evaluation: the value (0-d float32 tensor, on the parameters' device)
/// and the gradient as one flat buffer in the parameters' dtype.
pub struct Penalty {
    pub value: Tensor,
    pub grad: Tensor,
}

/// Checks shapes, dtypes and devices; every failure names what was expected.
fn validate(params: &[Tensor], star: &Tensor, fisher: &Tensor) -> Result<(Kind, Device, i64)> {
    let Some(first) = params.first() else {
        return value_err("params: expected at least one parameter tensor");
    };
    let (kind, device) = (first.kind(), first.device());
    let mut total = 0i64;
    for (i, p) in params.iter().enumerate() {
        if p.kind() != kind || p.device() != device {
            return value_err(format!(
                "params[{i}]: all parameters of one call must share dtype and device; \
                 expected {kind:?} on {device:?}, got {:?} on {:?}",
                p.kind(),
                p.device()
            ));
        }
        total += p.numel() as i64;
    }
    if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        return Err(EwcError::Type(format!(
            "params: expected float32, float16 or bfloat16 parameters, got {kind:?}"
        )));
    }
    for (name, t) in [("star", star), ("fisher", fisher)] {
        if t.dim() != 1 || t.size()[0] != total {
            return value_err(format!(
                "{name}: expected a flat buffer of {total} elements (the parameters' total), got shape {:?}",
                t.size()
            ));
        }
        if t.device() != device {
            return value_err(format!(
                "{name}: expected a tensor on {device:?} like the parameters, got {:?}",
                t.device()
            ));
        }
        if !matches!(t.kind(), Kind::Float | Kind::BFloat16) {
            return Err(EwcError::Type(format!(
                "{name}: expected float32 or bfloat16 storage, got {:?}",
                t.kind()
            )));
        }
    }
    Ok((kind, device, total))
}

pub fn penalty(params: &[Tensor], star: &Tensor, fisher: &Tensor, lam: f64) -> Result<Penalty> {
    let (kind, device, total) = validate(params, star, fisher)?;
    if device == Device::Cpu {
        cpu(params, star, fisher, lam, kind, total)
    } else {
        flat_ops(params, star, fisher, lam, kind)
    }
}

/// Any device: concatenate the parameters once, then a constant number of elementwise kernels.
fn flat_ops(
    params: &[Tensor],
    star: &Tensor,
    fisher: &Tensor,
    lam: f64,
    kind: Kind,
) -> Result<Penalty> {
    let flat: Vec<Tensor> = params.iter().map(|p| p.detach().reshape([-1])).collect();
    let theta = Tensor::f_cat(&flat, 0).ctx("penalty (concatenate parameters)")?;
    let diff = theta.to_kind(Kind::Float) - star.to_kind(Kind::Float);
    let fd = fisher.to_kind(Kind::Float) * &diff;
    let value = (&fd * &diff).sum(Kind::Float) * (0.5 * lam);
    let grad = (fd * lam).to_kind(kind);
    Ok(Penalty { value, grad })
}

/// Element access for the dtypes the CPU loop supports.
trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
}
impl Elem for f32 {
    fn get(self) -> f32 {
        self
    }
    fn put(x: f32) -> Self {
        x
    }
}
impl Elem for f16 {
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl Elem for bf16 {
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// One work item: `len` elements of parameter memory at `param` (address), matching the flat
/// buffers at `offset`. Addresses are plain integers so items can cross threads.
#[derive(Clone, Copy)]
struct Item {
    param: usize,
    offset: usize,
    len: usize,
}

fn cpu(
    params: &[Tensor],
    star: &Tensor,
    fisher: &Tensor,
    lam: f64,
    kind: Kind,
    total: i64,
) -> Result<Penalty> {
    // Non-contiguous parameters are rare; reading a contiguous copy keeps the loop simple.
    let params: Vec<Tensor> = params.iter().map(|p| p.detach().contiguous()).collect();
    let star = star.contiguous();
    let fisher = fisher.contiguous();
    let grad = Tensor::f_empty([total], (kind, Device::Cpu)).ctx("penalty (allocate gradient)")?;
    let elt = kind.elt_size_in_bytes();
    let mut items = Vec::new();
    let mut offset = 0usize;
    for p in &params {
        let n = p.numel();
        let base = p.data_ptr() as usize;
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            items.push(Item {
                param: base + start * elt,
                offset: offset + start,
                len,
            });
            start += len;
        }
        offset += n;
    }
    let ptrs = Ptrs {
        star: star.data_ptr() as usize,
        fisher: fisher.data_ptr() as usize,
        grad: grad.data_ptr() as usize,
    };
    let lam32 = lam as f32;
    let sum = match (kind, star.kind(), fisher.kind()) {
        (Kind::Float, Kind::Float, Kind::Float) => run::<f32, f32>(&items, ptrs, lam32),
        (Kind::Half, Kind::Float, Kind::Float) => run::<f16, f32>(&items, ptrs, lam32),
        (Kind::BFloat16, Kind::Float, Kind::Float) => run::<bf16, f32>(&items, ptrs, lam32),
        (Kind::Float, Kind::BFloat16, Kind::BFloat16) => run::<f32, bf16>(&items, ptrs, lam32),
        (Kind::Half, Kind::BFloat16, Kind::BFloat16) => run::<f16, bf16>(&items, ptrs, lam32),
        (Kind::BFloat16, Kind::BFloat16, Kind::BFloat16) => run::<bf16, bf16>(&items, ptrs, lam32),
        (_, s, f) => {
            return Err(EwcError::Type(format!(
                "star/fisher: expected both float32 or both bfloat16, got {s:?} and {f:?}"
            )))
        }
    };
    let value = Tensor::from((0.5 * lam * sum) as f32);
    Ok(Penalty { value, grad })
}

#[derive(Clone, Copy)]
struct Ptrs {
    star: usize,
    fisher: usize,
    grad: usize,
}

/// The loop itself: per element d = θ − θ*, g = λ F d, and Σ F d² (f32 per chunk, f64 overall).
fn run<P: Elem, S: Elem>(items: &[Item], ptrs: Ptrs, lam: f32) -> f64 {
    items
        .par_iter()
        .map(|it| {
            // SAFETY: every address comes from a live contiguous tensor of at least
            // `offset + len` elements of the stated dtype (checked in `validate`); the
            // gradient ranges of distinct items do not overlap.
            let (theta, star, fisher, grad) = unsafe {
                (
                    std::slice::from_raw_parts(it.param as *const P, it.len),
                    std::slice::from_raw_parts((ptrs.star as *const S).add(it.offset), it.len),
                    std::slice::from_raw_parts((ptrs.fisher as *const S).add(it.offset), it.len),
                    std::slice::from_raw_parts_mut((ptrs.grad as *mut P).add(it.offset), it.len),
                )
            };
            block_sum(theta, star, fisher, grad, lam)
        })
        .sum()
}

/// Lanes of the partial sums: lets the compiler vectorise the reduction, and keeps each f32
/// partial sum short (16 terms per lane per block) before it is added in f64.
const LANES: usize = 16;
const BLOCK: usize = 256;

#[inline]
fn block_sum<P: Elem, S: Elem>(
    theta: &[P],
    star: &[S],
    fisher: &[S],
    grad: &mut [P],
    lam: f32,
) -> f64 {
    let mut total = 0f64;
    let blocks = theta
        .chunks(BLOCK)
        .zip(star.chunks(BLOCK))
        .zip(fisher.chunks(BLOCK))
        .zip(grad.chunks_mut(BLOCK));
    for (((t, s), f), g) in blocks {
        let mut lanes = [0f32; LANES];
        let full = t.len() / LANES * LANES;
        for (((t, s), f), g) in t[..full]
            .chunks_exact(LANES)
            .zip(s[..full].chunks_exact(LANES))
            .zip(f[..full].chunks_exact(LANES))
            .zip(g[..full].chunks_exact_mut(LANES))
        {
            for l in 0..LANES {
                let d = t[l].get() - s[l].get();
                let fd = f[l].get() * d;
                lanes[l] += fd * d;
                g[l] = P::put(lam * fd);
            }
        }
        for i in full..t.len() {
            let d = t[i].get() - s[i].get();
            let fd = f[i].get() * d;
            lanes[0] += fd * d;
            g[i] = P::put(lam * fd);
        }
        total += lanes.iter().map(|&x| x as f64).sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(params: &[Tensor], star: &Tensor, fisher: &Tensor, lam: f64) -> (f64, Tensor) {
        let flat: Vec<Tensor> = params
            .iter()
            .map(|p| p.reshape([-1]).to_kind(Kind::Double))
            .collect();
        let theta = Tensor::cat(&flat, 0);
        let d = theta - star.to_kind(Kind::Double);
        let f = fisher.to_kind(Kind::Double);
        let value = (&f * &d * &d).sum(Kind::Double).double_value(&[]) * 0.5 * lam;
        (value, f * d * lam)
    }

    #[test]
    fn cpu_loop_matches_naive_formula_over_chunk_boundaries() {
        tch::manual_seed(0);
        let shapes: [&[i64]; 4] = [&[3, 5], &[70_000], &[7], &[2, 3, 4]];
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
            .collect();
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let star = Tensor::randn([total], (Kind::Float, Device::Cpu));
        let fisher = Tensor::rand([total], (Kind::Float, Device::Cpu));
        let out = penalty(&params, &star, &fisher, 3.5).unwrap();
        let (value, grad) = naive(&params, &star, &fisher, 3.5);
        let got = out.value.double_value(&[]);
        assert!(
            (got - value).abs() <= 1e-5 * value.abs(),
            "{got} vs {value}"
        );
        let err = (out.grad.to_kind(Kind::Double) - &grad)
            .norm()
            .double_value(&[])
            / grad.norm().double_value(&[]);
        assert!(err < 1e-6, "gradient relative error {err}");
    }

    #[test]
    fn flat_ops_path_matches_cpu_loop() {
        let params = vec![Tensor::randn([4, 4], (Kind::Float, Device::Cpu))];
        let star = Tensor::randn([16], (Kind::Float, Device::Cpu));
        let fisher = Tensor::rand([16], (Kind::Float, Device::Cpu));
        let a = cpu(&params, &star, &fisher, 2.0, Kind::Float, 16).unwrap();
        let b = flat_ops(&params, &star, &fisher, 2.0, Kind::Float).unwrap();
        assert!((a.value.double_value(&[]) - b.value.double_value(&[])).abs() < 1e-4);
        assert!((a.grad - b.grad).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn wrong_buffer_length_is_rejected_with_its_name() {
        let params = vec![Tensor::zeros([3], (Kind::Float, Device::Cpu))];
        let star = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let fisher = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let err = penalty(&params, &star, &fisher, 1.0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("star") && err.contains("3 elements"), "{err}");
    }
}
