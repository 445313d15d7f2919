//! The 8-bit Fisher: a logarithmic code with a scale pair per block of contiguous values.
//!
//! F is non-negative and spans many orders of magnitude, so the code is uniform in log₂ F within
//! each block of `block` values (a power of two, 16 to 65536; the last block of a tensor may be
//! short): hi = log₂ max, lo = max(log₂ min₊, hi − range), step = (hi − lo)/254. Code 0 is F = 0
//! (and values below 2^lo, flushed); code q ≥ 1 is 2^(lo + (q−1)·step). The scales are one
//! float32 pair (lo, step) per block, shaped `[blocks, 2]`. Relative error of a value: at most
//! 2^(step/2) − 1 (`benchmarks/fisher8_codes.py` measured the block size and range chosen in
//! Python, `ewc_rs._blocks.fisher8`).
//!
//! `quantize`/`dequantize` run as a multi-threaded loop on CPU tensors and as libtorch kernels on
//! other devices; the penalty reads the codes directly (`penalty::kernel`, the CUDA kernel).

use crate::error::{value_err, Context, EwcError, Result};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Codes per block: the last code is 255, so 254 steps span [lo, hi].
const STEPS: f64 = 254.0;

/// 2^x for x in [−125, 127] (clamped), branch-free so that loops over it vectorise: adding
/// 1.5·2²³ rounds x to the nearest integer n in the low mantissa bits (no `floor`, no float-to-int
/// conversion), n goes into the exponent bits, and 2^r for r = x − n in [−½, ½] is a degree-6
/// Taylor polynomial (relative error below 2·10⁻⁷, under a float32 rounding step of the code's own
/// error).
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: its ulp is 1
    let x = x.clamp(-125.0, 127.0);
    let shifted = x + MAGIC;
    let n = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let t = (x - (shifted - MAGIC)) * std::f32::consts::LN_2;
    let p = 1.0
        + t * (1.0
            + t * (0.5
                + t * (1.0 / 6.0 + t * (1.0 / 24.0 + t * (1.0 / 120.0 + t * (1.0 / 720.0))))));
    f32::from_bits((p.to_bits() as i32).wrapping_add(n << 23) as u32)
}

/// The value of code `q` in a block with scales `(lo, step)`.
#[inline(always)]
pub fn decode(q: u8, lo: f32, step: f32) -> f32 {
    let f = exp2(lo + (q as f32 - 1.0) * step);
    if q == 0 {
        0.0
    } else {
        f
    }
}

/// Blocks of `block` values in `n` values.
pub fn blocks(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

/// Checks a block size: a power of two from 16 to 65536 (it must divide the CPU pass's chunk).
pub fn check_block(block: usize) -> Result<u32> {
    if !(16..=65536).contains(&block) || !block.is_power_of_two() {
        return value_err(format!(
            "block: expected a power of two from 16 to 65536, got {block}"
        ));
    }
    Ok(block.trailing_zeros())
}

/// The codes (uint8, flat, one per value) and scales (`[blocks, 2]` float32: lo, step) of `f`
/// (any float dtype and shape, read flattened), on `f`'s device.
///
/// Errors: `fisher` not floating-point, negative or non-finite; a bad `block`; `range` not a
/// positive number of binades.
pub fn quantize(f: &Tensor, block: usize, range: f64) -> Result<(Tensor, Tensor)> {
    check_block(block)?;
    if range.is_nan() || range <= 0.0 {
        return value_err(format!(
            "range: expected a positive number of binades (inf for none), got {range}"
        ));
    }
    if !matches!(
        f.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(EwcError::Type(format!(
            "fisher: expected a floating-point tensor, got {:?}",
            f.kind()
        )));
    }
    let flat = f.reshape([-1]);
    if flat.numel() > 0 {
        let bad = flat.isfinite().logical_not().any().int64_value(&[]) != 0;
        if bad || flat.lt(0.0).any().int64_value(&[]) != 0 {
            return value_err("fisher: expected finite non-negative values");
        }
    }
    match f.device() {
        Device::Cpu => Ok(cpu_quantize(&flat, block, range)),
        _ => torch_quantize(&flat, block, range),
    }
}

fn cpu_quantize(flat: &Tensor, block: usize, range: f64) -> (Tensor, Tensor) {
    let f32s = flat.to_kind(Kind::Float).contiguous();
    let n = f32s.numel();
    let values: &[f32] = if n == 0 {
        &[]
    } else {
        // SAFETY: a contiguous float32 CPU tensor of n elements, alive for this function.
        unsafe { std::slice::from_raw_parts(f32s.data_ptr() as *const f32, n) }
    };
    let mut codes = vec![0u8; n];
    let mut scales = vec![0f32; 2 * blocks(n, block)];
    codes
        .par_chunks_mut(block)
        .zip(values.par_chunks(block))
        .zip(scales.par_chunks_mut(2))
        .for_each(|((q, v), s)| {
            let (lo, step) = block_scales(v, range);
            s[0] = lo as f32;
            s[1] = step as f32;
            for (q, &x) in q.iter_mut().zip(v) {
                *q = code(x as f64, lo, step);
            }
        });
    let codes = Tensor::from_slice(&codes);
    let scales = Tensor::from_slice(&scales).view([-1, 2]);
    (codes, scales)
}

/// (lo, step) of one block, in float64; (0, 0) for a block without a positive value.
fn block_scales(v: &[f32], range: f64) -> (f64, f64) {
    let (mut min, mut max) = (f32::INFINITY, 0f32);
    for &x in v {
        if x > 0.0 {
            min = min.min(x);
            max = max.max(x);
        }
    }
    if max <= 0.0 {
        return (0.0, 0.0);
    }
    let hi = (max as f64).log2();
    let lo = (min as f64).log2().max(hi - range);
    // The pair as stored (float32), so that codes are rounded against what decoding will use.
    let lo32 = lo as f32 as f64;
    (lo32, ((hi - lo32) / STEPS) as f32 as f64)
}

fn code(x: f64, lo: f64, step: f64) -> u8 {
    if x <= 0.0 {
        return 0;
    }
    if step == 0.0 {
        return u8::from(x.log2() >= lo - 0.5);
    }
    let k = ((x.log2() - lo) / step).round();
    if k < -0.5 {
        0 // below the block's range: flushed
    } else {
        (1.0 + k).clamp(1.0, 255.0) as u8
    }
}

/// The same code with libtorch kernels (for tensors off the CPU).
fn torch_quantize(flat: &Tensor, block: usize, range: f64) -> Result<(Tensor, Tensor)> {
    let n = flat.numel() as i64;
    let nb = blocks(n as usize, block) as i64;
    let device = flat.device();
    let padded = flat
        .to_kind(Kind::Float)
        .f_constant_pad_nd([0, nb * block as i64 - n])
        .ctx("quantize (pad)")?
        .view([nb, block as i64]);
    let positive = padded.gt(0.0);
    let inf = Tensor::full([], f64::INFINITY, (Kind::Float, device));
    let min = padded.where_self(&positive, &inf).amin([1], false);
    let max = padded.amax([1], false);
    let has = max.gt(0.0);
    let one = Tensor::ones([], (Kind::Float, device));
    let hi = max.where_self(&has, &one).to_kind(Kind::Double).log2();
    let lo = min
        .where_self(&has, &one)
        .to_kind(Kind::Double)
        .log2()
        .maximum(&(&hi - range))
        .to_kind(Kind::Float);
    let step = ((&hi - lo.to_kind(Kind::Double)) / STEPS).to_kind(Kind::Float);
    let (lo, step) = (
        lo.where_self(&has, &lo.zeros_like()),
        step.where_self(&has, &step.zeros_like()),
    );
    let l = padded
        .where_self(&positive, &one.expand_as(&padded))
        .to_kind(Kind::Double)
        .log2();
    let (lo2, step2) = (
        lo.to_kind(Kind::Double).unsqueeze(1),
        step.to_kind(Kind::Double).unsqueeze(1),
    );
    let flat_step = step2.eq(0.0);
    let safe = step2.where_self(&flat_step.logical_not(), &step2.ones_like());
    let k = ((&l - &lo2) / safe).round();
    let normal = (&k + 1.0).clamp(1.0, 255.0);
    let normal = normal.where_self(&k.ge(-0.5), &normal.zeros_like());
    let single = (&l - &lo2).ge(-0.5).to_kind(Kind::Double);
    let q = single.where_self(&flat_step, &normal);
    let q = q
        .where_self(&positive, &q.zeros_like())
        .to_kind(Kind::Uint8);
    let codes = q.view([-1]).narrow(0, 0, n).contiguous();
    let scales = Tensor::stack(&[lo, step], 1).contiguous();
    Ok((codes, scales))
}

/// Checks codes against scales: uint8 codes, float32 `[blocks(len, block), 2]` scales on one
/// device, both contiguous.
pub fn check_coded(codes: &Tensor, scales: &Tensor, block: usize) -> Result<()> {
    check_block(block)?;
    if codes.kind() != Kind::Uint8 || codes.dim() != 1 {
        return Err(EwcError::Type(format!(
            "codes: expected a flat uint8 tensor, got {:?} of shape {:?}",
            codes.kind(),
            codes.size()
        )));
    }
    let nb = blocks(codes.numel(), block) as i64;
    if scales.kind() != Kind::Float || scales.size() != [nb, 2] {
        return value_err(format!(
            "scales: expected float32 of shape [{nb}, 2] ({} codes in blocks of {block}), got {:?} of shape {:?}",
            codes.numel(),
            scales.kind(),
            scales.size()
        ));
    }
    if scales.device() != codes.device() {
        return value_err(format!(
            "scales: expected a tensor on {:?} like the codes, got {:?}",
            codes.device(),
            scales.device()
        ));
    }
    if !codes.is_contiguous() || !scales.is_contiguous() {
        return value_err("codes/scales: expected contiguous tensors");
    }
    Ok(())
}

/// The float32 values of `codes` (flat) with `scales`, on their device.
pub fn dequantize(codes: &Tensor, scales: &Tensor, block: usize) -> Result<Tensor> {
    check_coded(codes, scales, block)?;
    let n = codes.numel();
    if codes.device() != Device::Cpu {
        let at = Tensor::arange(n as i64, (Kind::Int64, codes.device()))
            .divide_scalar_mode(block as i64, "floor");
        let lo = scales.select(1, 0).index_select(0, &at);
        let step = scales.select(1, 1).index_select(0, &at);
        let q = codes.to_kind(Kind::Float);
        let f = (lo + (&q - 1.0) * step).exp2();
        return Ok(f.where_self(&q.gt(0.0), &f.zeros_like()));
    }
    if n == 0 {
        return Ok(Tensor::zeros([0], (Kind::Float, Device::Cpu)));
    }
    // SAFETY: contiguous CPU tensors of the checked kinds and lengths, alive for this function.
    let (q, s) = unsafe {
        (
            std::slice::from_raw_parts(codes.data_ptr() as *const u8, n),
            std::slice::from_raw_parts(scales.data_ptr() as *const f32, 2 * blocks(n, block)),
        )
    };
    let mut out = vec![0f32; n];
    out.par_chunks_mut(block)
        .zip(q.par_chunks(block))
        .zip(s.par_chunks(2))
        .for_each(|((o, q), s)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = decode(q, s[0], s[1]);
            }
        });
    Ok(Tensor::from_slice(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_spread(n: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        // 12 decades, some exact zeros
        let e = Tensor::rand([n], (Kind::Float, Device::Cpu)) * -12.0;
        let f = Tensor::from(10.0f32).pow(&e);
        let zero = Tensor::rand([n], (Kind::Float, Device::Cpu)).lt(0.05);
        f.where_self(&zero.logical_not(), &f.zeros_like())
    }

    #[test]
    fn exp2_is_accurate_over_the_range() {
        for i in -1250..1270 {
            let x = i as f32 * 0.1 + 0.013;
            let want = (x as f64).exp2();
            let got = exp2(x) as f64;
            assert!(((got - want) / want).abs() < 3e-7, "2^{x}: {got} vs {want}");
        }
    }

    #[test]
    fn decoded_values_are_within_half_a_step_in_log2() {
        let f = log_spread(10_000, 0);
        for (block, range) in [(64usize, f64::INFINITY), (256, 24.0), (16, 8.0)] {
            let (codes, scales) = quantize(&f, block, range).unwrap();
            assert_eq!(scales.size(), [blocks(10_000, block) as i64, 2]);
            let back = dequantize(&codes, &scales, block).unwrap();
            let step = scales.select(1, 1).to_kind(Kind::Double);
            let lo = scales.select(1, 0).to_kind(Kind::Double);
            let fv = Vec::<f32>::try_from(&f).unwrap();
            let bv = Vec::<f32>::try_from(&back).unwrap();
            let sv = Vec::<f64>::try_from(&step).unwrap();
            let lv = Vec::<f64>::try_from(&lo).unwrap();
            for (i, (&x, &y)) in fv.iter().zip(&bv).enumerate() {
                let (b, s) = (i / block, sv[i / block]);
                if x == 0.0 || (x as f64).log2() < lv[b] - s / 2.0 - 1e-6 {
                    assert_eq!(y, 0.0, "{i}: {x} flushed or zero");
                    continue;
                }
                let err = ((y as f64).log2() - (x as f64).log2()).abs();
                assert!(err <= s / 2.0 + 1e-5, "{i}: {x} -> {y}, step {s}");
            }
        }
    }

    #[test]
    fn torch_ops_give_the_codes_of_the_cpu_loop() {
        let f = log_spread(5_000, 1);
        let (codes, scales) = quantize(&f, 64, 24.0).unwrap();
        let (tc, ts) = torch_quantize(&f, 64, 24.0).unwrap();
        assert!(scales.allclose(&ts, 1e-6, 1e-6, false));
        let diff = (codes.to_kind(Kind::Int16) - tc.to_kind(Kind::Int16)).abs();
        assert!(diff.max().int64_value(&[]) <= 1);
        assert!(diff.gt(0).sum(Kind::Int64).int64_value(&[]) <= 5);
        let a = dequantize(&codes, &scales, 64).unwrap();
        let at = Tensor::arange(5000, (Kind::Int64, Device::Cpu)).divide_scalar_mode(64, "floor");
        let lo = scales.select(1, 0).index_select(0, &at);
        let step = scales.select(1, 1).index_select(0, &at);
        let q = codes.to_kind(Kind::Float);
        let b = (lo + (&q - 1.0) * step).exp2();
        let b = b.where_self(&q.gt(0.0), &b.zeros_like());
        assert!(a.allclose(&b, 1e-6, 0.0, false));
    }

    #[test]
    fn bad_input_is_refused_with_its_name() {
        let f = Tensor::from_slice(&[1.0f32, -1.0]);
        let e = quantize(&f, 64, 24.0).err().unwrap().to_string();
        assert!(e.contains("fisher") && e.contains("non-negative"), "{e}");
        let f = Tensor::from_slice(&[1.0f32, f32::NAN]);
        assert!(quantize(&f, 64, 24.0).is_err());
        let ok = Tensor::from_slice(&[1.0f32, 2.0]);
        let e = quantize(&ok, 48, 24.0).err().unwrap().to_string();
        assert!(e.contains("block"), "{e}");
        let e = quantize(&ok, 64, 0.0).err().unwrap().to_string();
        assert!(e.contains("range"), "{e}");
        let (codes, scales) = quantize(&ok, 64, 24.0).unwrap();
        let e = dequantize(&codes, &scales.narrow(0, 0, 0), 64)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("scales") && e.contains("[1, 2]"), "{e}");
    }

    #[test]
    fn all_zero_and_constant_blocks() {
        let f = Tensor::cat(
            &[
                Tensor::zeros([20], (Kind::Float, Device::Cpu)),
                Tensor::full([16], 3.0, (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let (codes, scales) = quantize(&f, 16, f64::INFINITY).unwrap();
        let back = dequantize(&codes, &scales, 16).unwrap();
        let want = f.copy();
        assert!(back.allclose(&want, 1e-6, 0.0, false), "{back:?}");
    }
}
