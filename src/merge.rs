//! Fisher-weighted merging (Matena & Raffel 2022), one tensor at a time:
//! θ = Σ_i w_i (F_i + ε) θ_i / Σ_i w_i (F_i + ε), and without Fishers the weighted average
//! Σ_i w_i θ_i / Σ_i w_i. Where every w_i (F_i + ε) is 0 the weighted average is used.
//!
//! On CPU one multi-threaded pass reads each input once and writes the output once, accumulating
//! in float64 over chunks of a few thousand elements (no copy of any input, whatever its dtype);
//! elsewhere a few libtorch kernels per input accumulate in one float buffer of the output's size.

use crate::error::{value_err, Context, EwcError, Result};
use crate::memory::{span, writes_are_disjoint, Addr};
use half::{bf16, f16};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements a pool task handles: its float64 accumulators stay in the core's cache.
const CHUNK: usize = 4096;

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// Checks the inputs; every failure names the argument and what was expected.
fn validate(
    thetas: &[Tensor],
    fishers: Option<&[Tensor]>,
    weights: &[f64],
    eps: f64,
) -> Result<(Vec<i64>, Kind, Device)> {
    let Some(first) = thetas.first() else {
        return value_err("thetas: expected at least one tensor");
    };
    if weights.len() != thetas.len() {
        return value_err(format!(
            "weights: expected one weight per tensor ({}), got {}",
            thetas.len(),
            weights.len()
        ));
    }
    if let Some(i) = weights.iter().position(|w| !w.is_finite() || *w < 0.0) {
        return value_err(format!(
            "weights[{i}]: expected a finite non-negative number, got {}",
            weights[i]
        ));
    }
    if weights.iter().sum::<f64>() <= 0.0 {
        return value_err("weights: expected a positive sum");
    }
    if !eps.is_finite() || eps < 0.0 {
        return value_err(format!(
            "eps: expected a finite non-negative number, got {eps}"
        ));
    }
    let (shape, kind, device) = (first.size(), first.kind(), first.device());
    if !is_float(kind) {
        return Err(EwcError::Type(format!(
            "thetas[0]: expected a floating-point tensor, got {kind:?}"
        )));
    }
    for (i, t) in thetas.iter().enumerate() {
        if t.size() != shape || t.kind() != kind || t.device() != device {
            return value_err(format!(
                "thetas[{i}]: expected shape {shape:?}, {kind:?} on {device:?} like thetas[0], \
                 got shape {:?}, {:?} on {:?}",
                t.size(),
                t.kind(),
                t.device()
            ));
        }
    }
    if let Some(fishers) = fishers {
        if fishers.len() != thetas.len() {
            return value_err(format!(
                "fishers: expected one Fisher per tensor ({}), got {}",
                thetas.len(),
                fishers.len()
            ));
        }
        for (i, f) in fishers.iter().enumerate() {
            if f.size() != shape || f.device() != device {
                return value_err(format!(
                    "fishers[{i}]: expected shape {shape:?} on {device:?} like the tensors, got \
                     shape {:?} on {:?}",
                    f.size(),
                    f.device()
                ));
            }
            if !is_float(f.kind()) {
                return Err(EwcError::Type(format!(
                    "fishers[{i}]: expected a floating-point tensor, got {:?}",
                    f.kind()
                )));
            }
        }
    }
    Ok((shape, kind, device))
}

/// The merged tensor: shape, dtype and device of `thetas[0]`.
///
/// `fishers`, when given, holds one Fisher per tensor (any float dtype); `weights` one finite
/// non-negative weight per tensor, with a positive sum; `eps` ≥ 0 is added to every Fisher.
pub fn merge(
    thetas: &[Tensor],
    fishers: Option<&[Tensor]>,
    weights: &[f64],
    eps: f64,
) -> Result<Tensor> {
    let (shape, kind, device) = validate(thetas, fishers, weights, eps)?;
    match device {
        Device::Cpu => {
            let thetas: Vec<Tensor> = thetas.iter().map(Tensor::contiguous).collect();
            let fishers: Option<Vec<Tensor>> =
                fishers.map(|f| f.iter().map(Tensor::contiguous).collect());
            let out = Tensor::f_empty(&shape, (kind, device)).ctx("merge (allocate output)")?;
            let mut reads: Vec<_> = thetas.iter().map(span).collect();
            reads.extend(fishers.iter().flatten().map(span));
            assert!(writes_are_disjoint(&reads, &[span(&out)]), "fresh output");
            // SAFETY: every input is contiguous and alive for the call, `out` is a fresh
            // contiguous tensor of their length sharing memory with none of them (checked above).
            unsafe { cpu_merge(&thetas, fishers.as_deref(), weights, eps, &out) };
            Ok(out)
        }
        _ => torch_merge(thetas, fishers, weights, eps, kind),
    }
}

/// Reads `buf.len()` elements of kind `kind` from `addr`, element `start` on, as float64.
///
/// # Safety
/// `addr` must point at live contiguous memory of `kind` holding at least `start + buf.len()`
/// elements.
unsafe fn read(addr: Addr, kind: Kind, start: usize, buf: &mut [f64]) {
    let n = buf.len();
    match kind {
        Kind::Float => {
            let src = std::slice::from_raw_parts(addr.as_ptr::<f32>().add(start), n);
            buf.iter_mut().zip(src).for_each(|(b, s)| *b = *s as f64);
        }
        Kind::Double => {
            let src = std::slice::from_raw_parts(addr.as_ptr::<f64>().add(start), n);
            buf.copy_from_slice(src);
        }
        Kind::Half => {
            let src = std::slice::from_raw_parts(addr.as_ptr::<f16>().add(start), n);
            buf.iter_mut().zip(src).for_each(|(b, s)| *b = s.to_f64());
        }
        Kind::BFloat16 => {
            let src = std::slice::from_raw_parts(addr.as_ptr::<bf16>().add(start), n);
            buf.iter_mut().zip(src).for_each(|(b, s)| *b = s.to_f64());
        }
        _ => unreachable!("validated float kinds"),
    }
}

/// Writes `buf` as `kind` to `addr`, element `start` on (same contract as `read`, for writing).
unsafe fn write(addr: Addr, kind: Kind, start: usize, buf: &[f64]) {
    let n = buf.len();
    match kind {
        Kind::Float => {
            let dst = std::slice::from_raw_parts_mut(addr.as_ptr::<f32>().add(start), n);
            dst.iter_mut().zip(buf).for_each(|(d, b)| *d = *b as f32);
        }
        Kind::Double => {
            std::slice::from_raw_parts_mut(addr.as_ptr::<f64>().add(start), n).copy_from_slice(buf);
        }
        Kind::Half => {
            let dst = std::slice::from_raw_parts_mut(addr.as_ptr::<f16>().add(start), n);
            dst.iter_mut()
                .zip(buf)
                .for_each(|(d, b)| *d = f16::from_f64(*b));
        }
        Kind::BFloat16 => {
            let dst = std::slice::from_raw_parts_mut(addr.as_ptr::<bf16>().add(start), n);
            dst.iter_mut()
                .zip(buf)
                .for_each(|(d, b)| *d = bf16::from_f64(*b));
        }
        _ => unreachable!("validated float kinds"),
    }
}

/// One model's tensor as the CPU pass reads it: address and kind of θ, of F if any, the weight.
type Input = (Addr, Kind, Option<(Addr, Kind)>, f64);

/// The CPU pass: chunks of `CHUNK` elements over the rayon pool.
///
/// # Safety
/// Every tensor must be contiguous, alive for the call and of `out`'s length; `out` must share
/// memory with no input (each chunk of it is written by one task only).
unsafe fn cpu_merge(
    thetas: &[Tensor],
    fishers: Option<&[Tensor]>,
    weights: &[f64],
    eps: f64,
    out: &Tensor,
) {
    let numel = out.numel();
    let inputs: Vec<Input> = thetas
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = fishers.map(|f| (Addr::of(&f[i]), f[i].kind()));
            (Addr::of(t), t.kind(), f, weights[i])
        })
        .collect();
    let total_weight: f64 = weights.iter().sum();
    let (base, kind, weighted) = (Addr::of(out), out.kind(), fishers.is_some());
    (0..numel.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
        let start = c * CHUNK;
        let n = CHUNK.min(numel - start);
        let mut theta = vec![0.0f64; n];
        let mut fisher = vec![0.0f64; n];
        let mut num = vec![0.0f64; n];
        let mut den = vec![0.0f64; n];
        let mut plain = vec![0.0f64; n];
        for &(t, t_kind, f, w) in &inputs {
            if w == 0.0 {
                continue;
            }
            read(t, t_kind, start, &mut theta);
            match f {
                Some((f, f_kind)) => {
                    read(f, f_kind, start, &mut fisher);
                    for j in 0..n {
                        let wf = w * (fisher[j] + eps);
                        num[j] += wf * theta[j];
                        den[j] += wf;
                        plain[j] += w * theta[j];
                    }
                }
                None => plain.iter_mut().zip(&theta).for_each(|(p, t)| *p += w * t),
            }
        }
        let merged: Vec<f64> = if weighted {
            (0..n)
                .map(|j| {
                    if den[j] > 0.0 {
                        num[j] / den[j]
                    } else {
                        plain[j] / total_weight
                    }
                })
                .collect()
        } else {
            plain.iter().map(|p| p / total_weight).collect()
        };
        write(base, kind, start, &merged);
    });
}

/// Other devices: a few libtorch kernels per input, accumulating in float32 (float64 for float64
/// tensors) buffers of the output's size.
fn torch_merge(
    thetas: &[Tensor],
    fishers: Option<&[Tensor]>,
    weights: &[f64],
    eps: f64,
    kind: Kind,
) -> Result<Tensor> {
    let acc = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let total_weight: f64 = weights.iter().sum();
    let zeros = || thetas[0].f_zeros_like().and_then(|z| z.f_to_kind(acc));
    let mut plain = zeros().ctx("merge (accumulator)")?;
    let (mut num, mut den) = (zeros().ctx("merge")?, zeros().ctx("merge")?);
    for (i, t) in thetas.iter().enumerate() {
        let w = weights[i];
        if w == 0.0 {
            continue;
        }
        let t = t.f_to_kind(acc).ctx("merge (read tensor)")?;
        let _ = plain.f_add_(&(&t * w)).ctx("merge")?;
        if let Some(f) = fishers {
            let wf = (f[i].f_to_kind(acc).ctx("merge (read Fisher)")? + eps) * w;
            let _ = num.f_add_(&(&wf * &t)).ctx("merge")?;
            let _ = den.f_add_(&wf).ctx("merge")?;
        }
    }
    let plain = plain / total_weight;
    let merged = match fishers {
        Some(_) => {
            let positive = den.gt(0.0);
            let safe = den.where_scalarother(&positive, 1.0);
            (num / safe).f_where_self(&positive, &plain).ctx("merge")?
        }
        None => plain,
    };
    merged.f_to_kind(kind).ctx("merge (write output)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula of the module doc, element by element in float64.
    fn reference(
        thetas: &[Vec<f64>],
        fishers: Option<&[Vec<f64>]>,
        w: &[f64],
        eps: f64,
    ) -> Vec<f64> {
        (0..thetas[0].len())
            .map(|j| {
                let plain: f64 = thetas.iter().zip(w).map(|(t, w)| w * t[j]).sum::<f64>()
                    / w.iter().sum::<f64>();
                let Some(f) = fishers else { return plain };
                let den: f64 = f.iter().zip(w).map(|(f, w)| w * (f[j] + eps)).sum();
                let num: f64 = (0..thetas.len())
                    .map(|i| w[i] * (f[i][j] + eps) * thetas[i][j])
                    .sum();
                if den > 0.0 {
                    num / den
                } else {
                    plain
                }
            })
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    #[test]
    fn cpu_pass_equals_the_float64_formula_for_every_dtype_and_chunk_edge() {
        tch::manual_seed(7);
        let n = 3 * CHUNK as i64 + 17; // several chunks, a partial last one
        let opts = (Kind::Double, Device::Cpu);
        let thetas64: Vec<Tensor> = (0..3).map(|_| Tensor::randn([n], opts)).collect();
        let fishers64: Vec<Tensor> = (0..3)
            .map(|i| {
                let f = Tensor::rand([n], opts).pow_tensor_scalar(4.0);
                if i == 0 {
                    let _ = f.narrow(0, 0, 100).fill_(0.0); // zero in every model below
                }
                f
            })
            .collect();
        for f in &fishers64[1..] {
            let _ = f.narrow(0, 0, 50).fill_(0.0);
        }
        let w = [0.5, 0.2, 0.3];
        for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
            let thetas: Vec<Tensor> = thetas64.iter().map(|t| t.to_kind(kind)).collect();
            let fishers: Vec<Tensor> = fishers64.iter().map(|f| f.to_kind(Kind::Float)).collect();
            for eps in [0.0, 1e-3] {
                let got = merge(&thetas, Some(&fishers), &w, eps).unwrap();
                assert_eq!(got.kind(), kind);
                let t: Vec<Vec<f64>> = thetas.iter().map(values).collect();
                let f: Vec<Vec<f64>> = fishers.iter().map(values).collect();
                let want = Tensor::from_slice(&reference(&t, Some(&f), &w, eps)).to_kind(kind);
                let diff = (values(&got).iter().zip(values(&want)))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                let tol = if matches!(kind, Kind::Float | Kind::Double) {
                    1e-6
                } else {
                    1e-2
                };
                assert!(diff <= tol, "{kind:?} eps {eps}: max diff {diff}");
                let avg = merge(&thetas, None, &w, eps).unwrap();
                let want = reference(&t, None, &w, eps);
                let diff = (values(&avg).iter().zip(&want))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(diff <= tol, "average {kind:?}: {diff}");
            }
        }
    }

    #[test]
    fn non_contiguous_inputs_and_the_libtorch_path_agree() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let thetas: Vec<Tensor> = (0..2).map(|_| Tensor::randn([5, 7], opts).tr()).collect();
        let fishers: Vec<Tensor> = (0..2).map(|_| Tensor::rand([7, 5], opts)).collect();
        let w = [1.0, 3.0];
        let cpu = merge(&thetas, Some(&fishers), &w, 1e-8).unwrap();
        let ops = torch_merge(&thetas, Some(&fishers), &w, 1e-8, Kind::Float).unwrap();
        assert!(cpu.allclose(&ops, 1e-6, 1e-6, false));
        assert_eq!(cpu.size(), vec![7, 5]);
    }

    #[test]
    fn bad_input_is_refused_by_name() {
        let t = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let err = |r: Result<Tensor>| r.expect_err("refused").to_string();
        let two = [t.shallow_clone(), t.shallow_clone()];
        assert!(err(merge(&[], None, &[], 0.0)).contains("thetas"));
        assert!(err(merge(&two, None, &[1.0], 0.0)).contains("weights"));
        assert!(err(merge(&two, None, &[1.0, -1.0], 0.0)).contains("weights[1]"));
        assert!(err(merge(&two, None, &[0.0, 0.0], 0.0)).contains("positive sum"));
        assert!(err(merge(&two, None, &[1.0, 1.0], f64::NAN)).contains("eps"));
        let other = [
            t.shallow_clone(),
            Tensor::zeros([5], (Kind::Float, Device::Cpu)),
        ];
        assert!(err(merge(&other, None, &[1.0, 1.0], 0.0)).contains("thetas[1]"));
        assert!(err(merge(&two, Some(&other), &[1.0, 1.0], 0.0)).contains("fishers[1]"));
        let ints = [Tensor::zeros([4], (Kind::Int64, Device::Cpu))];
        assert!(err(merge(&ints, None, &[1.0], 0.0)).contains("floating-point"));
    }
}
