//! The fused EWC penalty: P = (λ/2) Σ_i F_i (θ_i − θ*_i)² and its gradient λ F_i (θ_i − θ*_i),
//! for all parameters together in one pass.
//!
//! θ* and F live in two flat buffers (built once per consolidation); the parameters stay where
//! the model keeps them. One pass reads θ, θ*, F and writes the gradient (16 bytes per float32
//! parameter, the memory floor), either into one flat buffer (`penalty`, for autograd) or added
//! straight into the parameters' `.grad` (`add_to_grads`): on CPU a multi-threaded loop
//! (`kernel`), on CUDA the NVRTC-compiled kernel (`crate::cuda`). Elsewhere, or where that kernel
//! cannot run, a fixed handful of libtorch kernels runs over the flat buffers (`flat_ops`).
//!
//! F is either a flat buffer of θ*'s dtype or 8-bit codes with a scale pair per block of each
//! parameter's values (`crate::fisher8`), decoded inside the pass: no float copy of F is made
//! (except by the libtorch fallback).

mod kernel;

use crate::cuda;
use crate::error::{value_err, Context, EwcError, Result};
use crate::fisher8;
use crate::memory::{span, writes_are_disjoint, Addr};
use half::{bf16, f16};
use kernel::{push_items, GradWrite, Item, Target};
use tch::{Device, Kind, Tensor};

/// Result of one penalty evaluation: the value (0-d float32 tensor, on the parameters' device),
/// the gradient as one flat buffer in the parameters' dtype, and one view of that buffer per
/// parameter, shaped like it (made here, without the GIL: hundreds of small views cost more
/// from Python than the whole pass).
pub struct Penalty {
    pub value: Tensor,
    pub grad: Tensor,
    pub views: Vec<Tensor>,
}

/// Result of `add_to_grads`: the value, and `(index, gradient)` for each parameter whose gradient
/// could not be added in place: it had no `.grad` (install this one) or its `.grad` has another
/// dtype or layout, or shares memory with what the pass reads (add this one to it).
pub struct AddedToGrads {
    pub value: Tensor,
    pub pending: Vec<(usize, Tensor)>,
}

/// F as the pass reads it: a flat buffer of θ*'s dtype, or 8-bit codes (flat uint8, one per
/// element) with float32 `(lo, step)` scales per block of `block` values of each parameter, the
/// parameters' blocks one after another (`[Σ ceil(numel / block), 2]`).
#[derive(Clone, Copy)]
pub enum Fisher<'a> {
    Dense(&'a Tensor),
    Coded {
        codes: &'a Tensor,
        scales: &'a Tensor,
        block: usize,
    },
}

impl Fisher<'_> {
    /// The tensors read for F.
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Fisher::Dense(f) => vec![*f],
            Fisher::Coded { codes, scales, .. } => vec![*codes, *scales],
        }
    }

    /// log₂ of the block size (0 for a dense F: items need no block index).
    fn block_log2(&self) -> u32 {
        match self {
            Fisher::Dense(_) => 0,
            Fisher::Coded { block, .. } => block.trailing_zeros(),
        }
    }

    /// Scale blocks of a parameter of `numel` values (0 for a dense F).
    fn blocks_of(&self, numel: usize) -> usize {
        match self {
            Fisher::Dense(_) => 0,
            Fisher::Coded { block, .. } => fisher8::blocks(numel, *block),
        }
    }

    /// F of the parameters as one float32 buffer (the libtorch fallback's copy).
    fn dense(&self, params: &[Tensor]) -> Result<Tensor> {
        let (codes, scales, block) = match self {
            Fisher::Dense(f) => return Ok(f.to_kind(Kind::Float)),
            Fisher::Coded {
                codes,
                scales,
                block,
            } => (*codes, *scales, *block),
        };
        let (mut offset, mut first) = (0i64, 0i64);
        let mut parts = Vec::with_capacity(params.len());
        for p in params {
            let (n, nb) = (p.numel() as i64, self.blocks_of(p.numel()) as i64);
            let (c, s) = (codes.narrow(0, offset, n), scales.narrow(0, first, nb));
            parts.push(fisher8::dequantize(&c, &s, block)?);
            (offset, first) = (offset + n, first + nb);
        }
        Tensor::f_cat(&parts, 0).ctx("penalty (decode F)")
    }
}

/// Checks shapes, dtypes and devices; every failure names what was expected.
fn validate(params: &[Tensor], star: &Tensor, fisher: Fisher<'_>) -> Result<(Kind, Device, i64)> {
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
    let mut flat = vec![("star", star)];
    match fisher {
        Fisher::Dense(f) => flat.push(("fisher", f)),
        Fisher::Coded {
            codes,
            scales,
            block,
        } => {
            fisher8::check_block(block)?;
            if codes.kind() != Kind::Uint8
                || codes.dim() != 1
                || codes.size()[0] != total
                || !codes.is_contiguous()
            {
                return Err(EwcError::Type(format!(
                    "fisher: expected contiguous flat uint8 codes of {total} elements (the parameters' total), got {:?} of shape {:?}",
                    codes.kind(),
                    codes.size()
                )));
            }
            let nb: i64 = params
                .iter()
                .map(|p| fisher8::blocks(p.numel(), block) as i64)
                .sum();
            if scales.kind() != Kind::Float || scales.size() != [nb, 2] || !scales.is_contiguous() {
                return value_err(format!(
                    "fisher_code: expected scales of contiguous float32 of shape [{nb}, 2] (the parameters' blocks of {block}), got {:?} of shape {:?}",
                    scales.kind(),
                    scales.size()
                ));
            }
            for (name, t) in [("fisher", codes), ("fisher_code (scales)", scales)] {
                if t.device() != device {
                    return value_err(format!(
                        "{name}: expected a tensor on {device:?} like the parameters, got {:?}",
                        t.device()
                    ));
                }
            }
        }
    }
    for (name, t) in flat {
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

/// Computes the penalty and its gradient. `out`, when given, receives the gradient (a flat,
/// contiguous buffer of the parameters' dtype, device and total length): reusing one buffer
/// across training steps saves the page faults of a fresh allocation, which on CPU cost more
/// than the pass itself for large models.
pub fn penalty(
    params: &[Tensor],
    star: &Tensor,
    fisher: Fisher<'_>,
    lam: f64,
    out: Option<Tensor>,
) -> Result<Penalty> {
    let (kind, device, total) = validate(params, star, fisher)?;
    let grad = match out {
        Some(t) => {
            if t.size() != [total] || t.kind() != kind || t.device() != device || !t.is_contiguous()
            {
                return value_err(format!(
                    "out: expected a contiguous flat {kind:?} buffer of {total} elements on \
                     {device:?}, got {:?} of shape {:?} on {:?}",
                    t.kind(),
                    t.size(),
                    t.device()
                ));
            }
            // Checked before anything is written: a failed call leaves the caller's buffer alone.
            if !starts_its_storage(&t)? {
                return value_err(
                    "out: expected a buffer that starts its storage, not a slice of another tensor",
                );
            }
            let mut reads: Vec<_> = params.iter().map(span).collect();
            reads.push(span(star));
            reads.extend(fisher.tensors().into_iter().map(span));
            if !writes_are_disjoint(&reads, &[span(&t)]) {
                return value_err(
                    "out: expected a buffer that shares no memory with the parameters, star or \
                     fisher",
                );
            }
            t
        }
        None => Tensor::f_empty([total], (kind, device)).ctx("penalty (allocate gradient)")?,
    };
    let params: Vec<Tensor> = params.iter().map(contiguous).collect();
    let (base, elt) = (Addr::of(&grad), kind.elt_size_in_bytes());
    let value = match device {
        Device::Cpu => {
            let mut items = Vec::new();
            let (mut offset, mut block) = (0usize, 0usize);
            for p in &params {
                let n = p.numel();
                let target = Target {
                    param: Addr::of(p),
                    grad: base.byte_add(offset * elt),
                    write: GradWrite::Overwrite,
                    block,
                };
                push_items(&mut items, target, (offset, n), elt, fisher.block_log2());
                offset += n;
                block += fisher.blocks_of(n);
            }
            cpu_pass(&items, star, fisher, kind, Scale { lam, grad: 1.0 })?
        }
        Device::Cuda(ordinal) => {
            let mut targets = Vec::with_capacity(params.len());
            let (mut offset, mut block) = (0usize, 0usize);
            for p in &params {
                let grad = base.byte_add(offset * elt);
                targets.push(gpu_target(p, grad, (offset, block), GradWrite::Overwrite));
                offset += p.numel();
                block += fisher.blocks_of(p.numel());
            }
            match gpu_pass(
                ordinal,
                &targets,
                star,
                fisher,
                kind,
                Scale { lam, grad: 1.0 },
            )? {
                Some(value) => value,
                None => flat_ops(&params, star, fisher, lam, &grad)?,
            }
        }
        _ => flat_ops(&params, star, fisher, lam, &grad)?,
    };
    let views = views(&grad, &params)?;
    Ok(Penalty { value, grad, views })
}

/// Adds `scale` times the penalty's gradient to the parameters' `.grad` in the same pass that
/// computes the value (CPU and CUDA): no autograd graph, no flat buffer. Reads each `.grad` here
/// (no per-tensor round trip through Python); parameters that do not require grad get none.
pub fn add_to_grads(
    params: &[Tensor],
    star: &Tensor,
    fisher: Fisher<'_>,
    lam: f64,
    scale: f64,
) -> Result<AddedToGrads> {
    let (kind, device, _) = validate(params, star, fisher)?;
    if !matches!(device, Device::Cpu | Device::Cuda(_)) {
        return value_err(format!(
            "params: add_to_grads runs on CPU or CUDA tensors, got {device:?} (use penalty there)"
        ));
    }
    let params: Vec<Tensor> = params.iter().map(contiguous).collect();
    let mut grads = Vec::with_capacity(params.len());
    for p in &params {
        let g = if p.requires_grad() {
            Some(p.f_grad().ctx("add_to_grads (read .grad)")?).filter(|g| g.defined())
        } else {
            None
        };
        let writable = g.as_ref().is_some_and(|g| {
            g.kind() == kind && g.device() == device && g.is_contiguous() && g.size() == p.size()
        });
        grads.push(g.filter(|_| writable));
    }
    // A `.grad` sharing memory with what the pass reads, or with another `.grad`, is not written
    // in place (the kernel's contract); all gradients then go through fresh buffers.
    let mut reads: Vec<_> = params.iter().map(span).collect();
    reads.push(span(star));
    reads.extend(fisher.tensors().into_iter().map(span));
    let writes: Vec<_> = grads.iter().flatten().map(span).collect();
    if !writes_are_disjoint(&reads, &writes) {
        grads.iter_mut().for_each(|g| *g = None);
    }
    let elt = kind.elt_size_in_bytes();
    let mut items = Vec::new();
    let mut targets = Vec::new();
    let mut pending = Vec::new();
    // Gradients of parameters that take none: computed (the value needs the pass) and dropped.
    let mut scratch = Vec::new();
    let (mut offset, mut block) = (0usize, 0usize);
    for (i, (p, g)) in params.iter().zip(grads).enumerate() {
        let (grad, write) = match g {
            Some(g) => (Addr::of(&g), GradWrite::Add),
            None => {
                let fresh = Tensor::f_empty(p.size().as_slice(), (kind, device))
                    .ctx("add_to_grads (allocate gradient)")?;
                let at = Addr::of(&fresh);
                if p.requires_grad() {
                    pending.push((i, fresh));
                } else {
                    scratch.push(fresh);
                }
                (at, GradWrite::Overwrite)
            }
        };
        if device == Device::Cpu {
            let target = Target {
                param: Addr::of(p),
                grad,
                write,
                block,
            };
            push_items(
                &mut items,
                target,
                (offset, p.numel()),
                elt,
                fisher.block_log2(),
            );
        } else {
            targets.push(gpu_target(p, grad, (offset, block), write));
        }
        offset += p.numel();
        block += fisher.blocks_of(p.numel());
    }
    let scale = Scale { lam, grad: scale };
    let value = match device {
        Device::Cuda(ordinal) => match gpu_pass(ordinal, &targets, star, fisher, kind, scale)? {
            Some(value) => value,
            // The kernel cannot run here: the libtorch path's gradients, all handed back.
            None => return add_by_ops(&params, star, fisher, scale),
        },
        _ => cpu_pass(&items, star, fisher, kind, scale)?,
    };
    drop(scratch);
    Ok(AddedToGrads { value, pending })
}

/// `add_to_grads` where the CUDA kernel cannot run: the libtorch path's flat gradient, scaled,
/// returned as `pending` for every parameter that requires grad (the caller adds or installs).
fn add_by_ops(
    params: &[Tensor],
    star: &Tensor,
    fisher: Fisher<'_>,
    scale: Scale,
) -> Result<AddedToGrads> {
    let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
    let first = &params[0];
    let mut flat = Tensor::f_empty([total], (first.kind(), first.device()))
        .ctx("add_to_grads (allocate gradient)")?;
    let value = flat_ops(params, star, fisher, scale.lam, &flat)?;
    if scale.grad != 1.0 {
        let _ = flat.f_mul_scalar_(scale.grad).ctx("add_to_grads (scale)")?;
    }
    let views = views(&flat, params)?;
    let pending = views
        .into_iter()
        .enumerate()
        .filter(|(i, _)| params[*i].requires_grad())
        .collect();
    Ok(AddedToGrads { value, pending })
}

/// A parameter tensor as the CUDA kernel sees it (`at`: its offset in the flat buffers and the
/// index of its first block of 8-bit F's scales).
fn gpu_target(p: &Tensor, grad: Addr, at: (usize, usize), write: GradWrite) -> cuda::Target {
    cuda::Target {
        param: p.data_ptr() as u64,
        grad: grad.as_ptr::<u8>() as u64,
        offset: at.0 as u64,
        len: p.numel() as u64,
        add: write == GradWrite::Add,
        block: at.1 as u64,
    }
}

/// The CUDA kernel over `targets`; `None` when it cannot run on this GPU (see `cuda::status`).
fn gpu_pass(
    ordinal: usize,
    targets: &[cuda::Target],
    star: &Tensor,
    fisher: Fisher<'_>,
    kind: Kind,
    scale: Scale,
) -> Result<Option<Tensor>> {
    let star = contiguous(star);
    let dense;
    let fisher = match fisher {
        Fisher::Dense(f) => {
            dense = contiguous(f);
            cuda::Fisher::Dense(&dense)
        }
        Fisher::Coded {
            codes,
            scales,
            block,
        } => cuda::Fisher::Coded {
            codes,
            scales,
            block_log2: block.trailing_zeros(),
        },
    };
    let coef = (scale.lam * scale.grad) as f32;
    // SAFETY: the targets were made from live contiguous tensors of `kind` on this GPU (the
    // parameters, and the flat gradient or fresh/validated `.grad` tensors); `validate` checked
    // that `star` and `fisher` hold the parameters' total number of elements on the same device;
    // the callers checked with `writes_are_disjoint` that no gradient target overlaps the inputs
    // or another target. The tensors outlive the kernels: torch's allocator reuses their memory
    // only for work queued after them on the same stream.
    unsafe {
        cuda::penalty(
            ordinal as i32,
            targets,
            &star,
            fisher,
            kind,
            coef,
            scale.lam,
        )
    }
}

/// A contiguous tensor of the same data: `t` itself when it already is (the usual case; no
/// libtorch op, which matters with hundreds of small parameter tensors), else a copy.
fn contiguous(t: &Tensor) -> Tensor {
    if t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.contiguous()
    }
}

/// λ, and the factor applied to the gradient only (e.g. a gradient scaler's).
#[derive(Clone, Copy)]
struct Scale {
    lam: f64,
    grad: f64,
}

/// Runs the kernel for the dtype combination; returns the value (λ/2) Σ F d² as a 0-d tensor.
fn cpu_pass(
    items: &[Item],
    star: &Tensor,
    fisher: Fisher<'_>,
    kind: Kind,
    scale: Scale,
) -> Result<Tensor> {
    let glam = (scale.lam * scale.grad) as f32;
    let fisher = match fisher {
        Fisher::Dense(f) => f,
        Fisher::Coded {
            codes,
            scales,
            block,
        } => {
            let star = contiguous(star);
            let coded = (Addr::of(codes), Addr::of(scales), block.trailing_zeros());
            let s = Addr::of(&star);
            // SAFETY: as below; `validate` checked the codes' length (the parameters' total)
            // and the scales' (one pair per block of each parameter, contiguous), and items
            // were numbered with the same blocks.
            let sum = unsafe {
                match (kind, star.kind()) {
                    (Kind::Float, Kind::Float) => {
                        kernel::run_coded::<f32, f32>(items, s, coded, glam)
                    }
                    (Kind::Half, Kind::Float) => {
                        kernel::run_coded::<f16, f32>(items, s, coded, glam)
                    }
                    (Kind::BFloat16, Kind::Float) => {
                        kernel::run_coded::<bf16, f32>(items, s, coded, glam)
                    }
                    (Kind::Float, Kind::BFloat16) => {
                        kernel::run_coded::<f32, bf16>(items, s, coded, glam)
                    }
                    (Kind::Half, Kind::BFloat16) => {
                        kernel::run_coded::<f16, bf16>(items, s, coded, glam)
                    }
                    (Kind::BFloat16, Kind::BFloat16) => {
                        kernel::run_coded::<bf16, bf16>(items, s, coded, glam)
                    }
                    (_, s) => {
                        return Err(EwcError::Type(format!(
                            "star: expected float32 or bfloat16, got {s:?}"
                        )))
                    }
                }
            };
            return Ok(Tensor::from((0.5 * scale.lam * sum) as f32));
        }
    };
    let (star, fisher) = (contiguous(star), contiguous(fisher));
    let (s, f) = (Addr::of(&star), Addr::of(&fisher));
    // SAFETY: items were built from live contiguous tensors of `kind` (parameters, and the flat
    // gradient or fresh/validated `.grad` tensors); `validate` checked that `star` and `fisher`
    // hold the parameters' total number of elements; the callers checked with
    // `writes_are_disjoint` that no gradient target overlaps the inputs or another target
    // (fresh buffers overlap nothing).
    let sum = unsafe {
        match (kind, star.kind(), fisher.kind()) {
            (Kind::Float, Kind::Float, Kind::Float) => kernel::run::<f32, f32>(items, s, f, glam),
            (Kind::Half, Kind::Float, Kind::Float) => kernel::run::<f16, f32>(items, s, f, glam),
            (Kind::BFloat16, Kind::Float, Kind::Float) => {
                kernel::run::<bf16, f32>(items, s, f, glam)
            }
            (Kind::Float, Kind::BFloat16, Kind::BFloat16) => {
                kernel::run::<f32, bf16>(items, s, f, glam)
            }
            (Kind::Half, Kind::BFloat16, Kind::BFloat16) => {
                kernel::run::<f16, bf16>(items, s, f, glam)
            }
            (Kind::BFloat16, Kind::BFloat16, Kind::BFloat16) => {
                kernel::run::<bf16, bf16>(items, s, f, glam)
            }
            (_, s, f) => {
                return Err(EwcError::Type(format!(
                    "star/fisher: expected both float32 or both bfloat16, got {s:?} and {f:?}"
                )))
            }
        }
    };
    Ok(Tensor::from((0.5 * scale.lam * sum) as f32))
}

/// Whether `t` begins at offset 0 of its storage: `as_strided` offsets (in `views`) count from
/// the storage's start, not from the tensor's.
fn starts_its_storage(t: &Tensor) -> Result<bool> {
    if t.numel() == 0 {
        return Ok(true); // nothing is written, nothing is viewed
    }
    let base = t.f_as_strided([1], [1], 0).ctx("penalty (check out)")?;
    Ok(base.data_ptr() == t.data_ptr())
}

/// Views of the flat `grad`, one per parameter in order, each shaped like its parameter
/// (contiguous strides). One `as_strided` each: a third of the cost of `narrow` + `view`, which
/// matters with hundreds of parameter tensors. `grad` starts its storage (checked in `penalty`).
fn views(grad: &Tensor, params: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut offset = 0i64;
    params
        .iter()
        .map(|p| {
            let size = p.size();
            let mut stride = vec![1i64; size.len()];
            for d in (1..size.len()).rev() {
                stride[d - 1] = stride[d] * size[d];
            }
            let view = grad
                .f_as_strided(size.as_slice(), stride.as_slice(), offset)
                .ctx("penalty (gradient views)")?;
            offset += size.iter().product::<i64>();
            Ok(view)
        })
        .collect()
}

/// Any device: concatenate the parameters once, then a constant number of elementwise kernels.
fn flat_ops(
    params: &[Tensor],
    star: &Tensor,
    fisher: Fisher<'_>,
    lam: f64,
    grad: &Tensor,
) -> Result<Tensor> {
    let flat: Vec<Tensor> = params.iter().map(|p| p.detach().reshape([-1])).collect();
    let theta = Tensor::f_cat(&flat, 0).ctx("penalty (concatenate parameters)")?;
    let diff = theta.to_kind(Kind::Float) - star.to_kind(Kind::Float);
    let mut fd = fisher.dense(params)? * &diff;
    let value = (&fd * &diff).sum(Kind::Float) * (0.5 * lam);
    // Computed in float32 and rounded into `grad` (of the parameters' dtype): `mul_out` into a
    // float16/bfloat16 buffer would refuse the float32 input.
    let mut grad = grad.shallow_clone();
    if grad.kind() == Kind::Float {
        let _ = fd
            .f_mul_scalar_out(&grad, lam)
            .ctx("penalty (write gradient)")?;
    } else {
        let _ = fd.f_mul_scalar_(lam).ctx("penalty (scale gradient)")?;
        grad.f_copy_(&fd).ctx("penalty (write gradient)")?;
    }
    Ok(value)
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
        let out = penalty(&params, &star, Fisher::Dense(&fisher), 3.5, None).unwrap();
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

    /// Parameters, θ* of `storage` dtype, and F spanning ~30 binades (below float16 overflow) coded per parameter in
    /// blocks of `block`: (params, star, codes, scales, the decoded F).
    fn coded_case(
        shapes: &[&[i64]],
        kind: Kind,
        storage: Kind,
        block: usize,
    ) -> (Vec<Tensor>, Tensor, Tensor, Tensor, Tensor) {
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)).to_kind(kind))
            .collect();
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let star = Tensor::randn([total], (Kind::Float, Device::Cpu)).to_kind(storage);
        let wide = (Tensor::randn([total], (Kind::Float, Device::Cpu)) * 4.0).exp() * 1e-5;
        let (mut codes, mut scales, mut decoded, mut at) = (vec![], vec![], vec![], 0i64);
        for p in &params {
            let n = p.numel() as i64;
            let (c, s) = fisher8::quantize(&wide.narrow(0, at, n), block, 32.0).unwrap();
            decoded.push(fisher8::dequantize(&c, &s, block).unwrap());
            codes.push(c);
            scales.push(s);
            at += n;
        }
        let cat = |v: Vec<Tensor>| Tensor::cat(&v, 0);
        (params, star, cat(codes), cat(scales), cat(decoded))
    }

    #[test]
    fn coded_fisher_reads_as_its_decoded_values_in_every_path() {
        tch::manual_seed(3);
        let shapes: [&[i64]; 5] = [&[3, 5], &[70_000], &[7], &[2, 3, 4], &[4097]];
        for (kind, storage) in [
            (Kind::Float, Kind::Float),
            (Kind::BFloat16, Kind::Float),
            (Kind::Float, Kind::BFloat16),
            (Kind::Half, Kind::BFloat16),
        ] {
            for block in [16, 64, 4096] {
                let what = format!("{kind:?}/{storage:?}, block {block}");
                let (params, star, codes, scales, f) = coded_case(&shapes, kind, storage, block);
                let fisher = Fisher::Coded {
                    codes: &codes,
                    scales: &scales,
                    block,
                };
                let (value, grad) = naive(&params, &star, &f, 2.5);
                let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
                let out = penalty(&params, &star, fisher, 2.5, None).unwrap();
                let got = out.value.double_value(&[]);
                assert!(
                    (got - value).abs() <= 1e-5 * value.abs(),
                    "{what}: {got} vs {value}"
                );
                let rel = |g: &Tensor| {
                    (g.to_kind(Kind::Double) - &grad).norm().double_value(&[])
                        / grad.norm().double_value(&[])
                };
                assert!(
                    rel(&out.grad) < tol,
                    "{what}: gradient error {}",
                    rel(&out.grad)
                );
                // The libtorch fallback decodes F per parameter: the same numbers.
                let flat = Tensor::empty([f.numel() as i64], (kind, Device::Cpu));
                let v = flat_ops(&params, &star, fisher, 2.5, &flat).unwrap();
                assert!(
                    (v.double_value(&[]) - value).abs() <= 1e-4 * value.abs(),
                    "{what}"
                );
                assert!(
                    rel(&flat) < tol,
                    "{what}: fallback gradient error {}",
                    rel(&flat)
                );
            }
        }
    }

    #[test]
    fn coded_fisher_with_wrong_scales_is_refused_by_name() {
        let (params, star, codes, scales, _) =
            coded_case(&[&[100], &[30]], Kind::Float, Kind::Float, 16);
        let short = scales.narrow(0, 0, scales.size()[0] - 1).contiguous();
        let fisher = Fisher::Coded {
            codes: &codes,
            scales: &short,
            block: 16,
        };
        let err = penalty(&params, &star, fisher, 1.0, None).err().unwrap();
        assert!(err.to_string().contains("fisher_code"), "{err}");
        let fisher = Fisher::Coded {
            codes: &codes,
            scales: &scales,
            block: 48,
        };
        let err = penalty(&params, &star, fisher, 1.0, None).err().unwrap();
        assert!(err.to_string().contains("block"), "{err}");
        let floats = codes.to_kind(Kind::Float);
        let fisher = Fisher::Coded {
            codes: &floats,
            scales: &scales,
            block: 16,
        };
        let err = penalty(&params, &star, fisher, 1.0, None).err().unwrap();
        assert!(err.to_string().contains("uint8"), "{err}");
    }

    #[test]
    fn flat_ops_path_matches_cpu_loop() {
        let params = vec![Tensor::randn([4, 4], (Kind::Float, Device::Cpu))];
        let star = Tensor::randn([16], (Kind::Float, Device::Cpu));
        let fisher = Tensor::rand([16], (Kind::Float, Device::Cpu));
        let empty = || Tensor::empty([16], (Kind::Float, Device::Cpu));
        let a = penalty(&params, &star, Fisher::Dense(&fisher), 2.0, None).unwrap();
        let gb = empty();
        let b = flat_ops(&params, &star, Fisher::Dense(&fisher), 2.0, &gb).unwrap();
        assert!((a.value.double_value(&[]) - b.double_value(&[])).abs() < 1e-4);
        assert!((a.grad - gb).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn out_buffer_is_written_and_views_follow_parameter_shapes() {
        let params = vec![
            Tensor::randn([2, 3], (Kind::Float, Device::Cpu)),
            Tensor::randn([4], (Kind::Float, Device::Cpu)),
        ];
        let star = Tensor::randn([10], (Kind::Float, Device::Cpu));
        let fisher = Tensor::rand([10], (Kind::Float, Device::Cpu));
        let fresh = penalty(&params, &star, Fisher::Dense(&fisher), 1.5, None).unwrap();
        let out = Tensor::full([10], f64::NAN, (Kind::Float, Device::Cpu));
        let ptr = out.data_ptr();
        let reused = penalty(&params, &star, Fisher::Dense(&fisher), 1.5, Some(out)).unwrap();
        assert_eq!(reused.grad.data_ptr(), ptr);
        assert!(reused.grad.allclose(&fresh.grad, 0.0, 0.0, false));
        assert_eq!(reused.views[0].size(), vec![2, 3]);
        assert_eq!(reused.views[1].size(), vec![4]);
        assert!(reused.views[1].allclose(&fresh.grad.narrow(0, 6, 4), 0.0, 0.0, false));
        let wrong = Tensor::zeros([9], (Kind::Float, Device::Cpu));
        let err = penalty(&params, &star, Fisher::Dense(&fisher), 1.5, Some(wrong))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("out") && err.contains("10 elements"), "{err}");
        let big = Tensor::full([11], 7.0, (Kind::Float, Device::Cpu));
        let err = penalty(
            &params,
            &star,
            Fisher::Dense(&fisher),
            1.5,
            Some(big.narrow(0, 1, 10)),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("starts its storage"), "{err}");
        assert!(
            big.eq(7.0).all().int64_value(&[]) == 1,
            "a rejected out buffer was written"
        );
    }

    #[test]
    fn add_to_grads_adds_in_place_and_returns_what_it_could_not() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let leaf = |s: &[i64]| Tensor::randn(s, opts).set_requires_grad(true);
        let params = vec![
            leaf(&[3, 4]),
            leaf(&[5]),
            leaf(&[2, 2]),
            Tensor::randn([3], opts),
        ];
        let star = Tensor::randn([24], opts);
        let fisher = Tensor::rand([24], opts);
        let expect = penalty(&params, &star, Fisher::Dense(&fisher), 0.7, None).unwrap();
        // .grad for params 0 (contiguous: added in place) and 2 (non-contiguous: returned)
        let loss = (&params[0] * Tensor::ones([3, 4], opts)).sum(Kind::Float)
            + (&params[2].tr() * Tensor::ones([2, 2], opts)).sum(Kind::Float);
        loss.backward();
        let g0_before = params[0].grad().copy();
        let got = add_to_grads(&params, &star, Fisher::Dense(&fisher), 0.7, 2.0).unwrap();
        let close = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-6, 1e-6, false);
        assert!(close(&got.value, &expect.value));
        assert!(close(
            &params[0].grad(),
            &(&g0_before + &expect.views[0] * 2.0)
        ));
        let idx: Vec<usize> = got.pending.iter().map(|(i, _)| *i).collect();
        // param 1 had no .grad; param 3 does not require grad and gets nothing
        let wants_2 = !params[2].grad().is_contiguous();
        assert_eq!(idx, if wants_2 { vec![1, 2] } else { vec![1] });
        assert!(close(&got.pending[0].1, &(&expect.views[1] * 2.0)));
    }

    #[test]
    fn out_sharing_memory_with_an_input_is_rejected_unwritten() {
        let opts = (Kind::Float, Device::Cpu);
        let star = Tensor::randn([6], opts);
        let fisher = Tensor::rand([6], opts);
        let params = vec![Tensor::randn([6], opts)];
        for out in [&star, &fisher, &params[0]] {
            let before = out.copy();
            let err = penalty(
                &params,
                &star,
                Fisher::Dense(&fisher),
                1.0,
                Some(out.shallow_clone()),
            )
            .err()
            .unwrap()
            .to_string();
            assert!(err.contains("shares no memory"), "{err}");
            assert!(out.equal(&before), "a rejected out buffer was written");
        }
    }

    #[test]
    fn wrong_buffer_length_is_rejected_with_its_name() {
        let params = vec![Tensor::zeros([3], (Kind::Float, Device::Cpu))];
        let star = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let fisher = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let err = penalty(&params, &star, Fisher::Dense(&fisher), 1.0, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("star") && err.contains("3 elements"), "{err}");
    }
}
