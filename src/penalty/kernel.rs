//! The CPU pass over raw memory: per element d = θ − θ*, g = c·F·d (written or added), and
//! Σ F d² (f32 per block of 256, f64 overall), multi-threaded over work items. F is a flat buffer
//! of θ*'s dtype (`run`) or 8-bit codes with their block scales (`run_coded`, `crate::fisher8`).

use crate::fisher8;
use crate::memory::Addr;
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per parallel task: big enough to amortise scheduling, small enough to balance.
pub const CHUNK: usize = 1 << 16;

/// Element access for the dtypes the loop supports (arithmetic is always f32).
pub trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
}
impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        x
    }
}
/// The `half` crate's types convert the same way.
macro_rules! half_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            #[inline(always)]
            fn get(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn put(x: f32) -> Self {
                <$t>::from_f32(x)
            }
        }
    )*};
}
half_elem!(f16, bf16);

/// Whether a work item's gradient overwrites its target or is added to what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    Overwrite,
    Add,
}

/// One parameter tensor as the kernel sees it: its elements at `param`, its gradient target at
/// `grad`, how the gradient is written, and (8-bit F) the index of its first block of scales.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub param: Addr,
    pub grad: Addr,
    pub write: GradWrite,
    pub block: usize,
}

/// One work item: `len` elements of a target from element `start` on, matching the flat θ* and
/// F buffers at `offset`; with 8-bit F, `block` is the scale block of its first element (items
/// start at multiples of `CHUNK`, which every block size divides).
#[derive(Clone, Copy, Debug)]
pub struct Item {
    pub param: Addr,
    pub grad: Addr,
    pub write: GradWrite,
    pub offset: usize,
    pub len: usize,
    pub block: usize,
}

/// Splits a target of `numel` elements of `elt` bytes each, whose θ*/F start at `offset`, into
/// items of at most `CHUNK` elements; `block_log2`: log₂ of the 8-bit F's block size (0 for a
/// float F).
pub fn push_items(
    items: &mut Vec<Item>,
    target: Target,
    (offset, numel): (usize, usize),
    elt: usize,
    block_log2: u32,
) {
    let mut start = 0;
    while start < numel {
        let len = CHUNK.min(numel - start);
        items.push(Item {
            param: target.param.byte_add(start * elt),
            grad: target.grad.byte_add(start * elt),
            write: target.write,
            offset: offset + start,
            len,
            block: target.block + (start >> block_log2),
        });
        start += len;
    }
}

/// Consecutive runs of items of about `CHUNK` elements together: the unit of parallel work.
/// Models have many small tensors (biases, norms); one task each would cost more in scheduling
/// than in arithmetic.
pub fn tasks(items: &[Item]) -> Vec<Range<usize>> {
    let mut tasks = Vec::new();
    let (mut start, mut len) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        len += it.len;
        if len >= CHUNK {
            tasks.push(start..i + 1);
            (start, len) = (i + 1, 0);
        }
    }
    if start < items.len() {
        tasks.push(start..items.len());
    }
    tasks
}

/// Runs every item; returns Σ F d². `glam` multiplies the gradient (λ times any scale).
/// A single task runs on the calling thread: waking the pool costs more than it saves.
///
/// # Safety
/// Every item's addresses must point into live, contiguous memory of the stated element types:
/// `len` elements at `param` and `grad`, `offset + len` at `star` and `fisher`; gradient ranges
/// must not overlap each other or the inputs (the caller checks this with
/// `memory::writes_are_disjoint`).
pub unsafe fn run<P: Elem, S: Elem>(items: &[Item], star: Addr, fisher: Addr, glam: f32) -> f64 {
    let wide = wide_simd();
    let task = |range: &Range<usize>| -> f64 {
        items[range.clone()]
            .iter()
            .map(|it| {
                // SAFETY: the caller's contract above.
                let (theta, s, f, g) = unsafe {
                    (
                        std::slice::from_raw_parts(it.param.as_ptr::<P>(), it.len),
                        std::slice::from_raw_parts(star.as_ptr::<S>().add(it.offset), it.len),
                        std::slice::from_raw_parts(fisher.as_ptr::<S>().add(it.offset), it.len),
                        std::slice::from_raw_parts_mut(it.grad.as_ptr::<P>(), it.len),
                    )
                };
                match (wide, it.write == GradWrite::Add) {
                    // SAFETY: `wide` is true only where the CPU has AVX2 and FMA.
                    (true, true) => unsafe { block_sum_avx2::<P, S, true>(theta, s, f, g, glam) },
                    (true, false) => unsafe { block_sum_avx2::<P, S, false>(theta, s, f, g, glam) },
                    (false, true) => block_sum::<P, S, true>(theta, s, f, g, glam),
                    (false, false) => block_sum::<P, S, false>(theta, s, f, g, glam),
                }
            })
            .sum::<f64>()
    };
    let tasks = tasks(items);
    if tasks.len() <= 1 {
        tasks.iter().map(task).sum()
    } else {
        tasks.par_iter().map(task).sum()
    }
}

/// `run` with F as 8-bit codes (one byte per element, at `codes`) and float32 `(lo, step)` pairs
/// per block of `1 << block_log2` codes (at `scales`); returns Σ F d².
///
/// # Safety
/// As `run`, with `codes` holding `offset + len` bytes for every item and `scales` a pair for
/// each block up to every item's `block + ceil(len / block size)`.
pub unsafe fn run_coded<P: Elem, S: Elem>(
    items: &[Item],
    star: Addr,
    (codes, scales, block_log2): (Addr, Addr, u32),
    glam: f32,
) -> f64 {
    let wide = wide_simd();
    let bs = 1usize << block_log2;
    let task = |range: &Range<usize>| -> f64 {
        items[range.clone()]
            .iter()
            .map(|it| {
                let nb = it.len.div_ceil(bs);
                // SAFETY: the caller's contract above.
                let (theta, s, q, sc, g) = unsafe {
                    (
                        std::slice::from_raw_parts(it.param.as_ptr::<P>(), it.len),
                        std::slice::from_raw_parts(star.as_ptr::<S>().add(it.offset), it.len),
                        std::slice::from_raw_parts(codes.as_ptr::<u8>().add(it.offset), it.len),
                        std::slice::from_raw_parts(
                            scales.as_ptr::<f32>().add(2 * it.block),
                            2 * nb,
                        ),
                        std::slice::from_raw_parts_mut(it.grad.as_ptr::<P>(), it.len),
                    )
                };
                let coded = Coded {
                    codes: q,
                    scales: sc,
                    block: bs,
                };
                match (wide, it.write == GradWrite::Add) {
                    // SAFETY: `wide` is true only where the CPU has AVX2 and FMA.
                    (true, true) => unsafe {
                        coded_sum_avx2::<P, S, true>(theta, s, coded, g, glam)
                    },
                    (true, false) => unsafe {
                        coded_sum_avx2::<P, S, false>(theta, s, coded, g, glam)
                    },
                    (false, true) => coded_sum::<P, S, true>(theta, s, coded, g, glam),
                    (false, false) => coded_sum::<P, S, false>(theta, s, coded, g, glam),
                }
            })
            .sum::<f64>()
    };
    let tasks = tasks(items);
    if tasks.len() <= 1 {
        tasks.iter().map(task).sum()
    } else {
        tasks.par_iter().map(task).sum()
    }
}

/// One item's 8-bit F: its codes, the scale pairs of its blocks, and the block size.
#[derive(Clone, Copy)]
struct Coded<'a> {
    codes: &'a [u8],
    scales: &'a [f32],
    block: usize,
}

/// `coded_sum` compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn coded_sum_avx2<P: Elem, S: Elem, const ACC: bool>(
    theta: &[P],
    star: &[S],
    fisher: Coded<'_>,
    grad: &mut [P],
    glam: f32,
) -> f64 {
    coded_sum::<P, S, ACC>(theta, star, fisher, grad, glam)
}

/// `block_sum` with F decoded from its codes on the fly, one scale block at a time (each value
/// 2^(lo + (q−1)·step), 0 for code 0: `fisher8::decode`, branch-free so that it vectorises).
#[inline(always)]
fn coded_sum<P: Elem, S: Elem, const ACC: bool>(
    theta: &[P],
    star: &[S],
    fisher: Coded<'_>,
    grad: &mut [P],
    glam: f32,
) -> f64 {
    let n = theta.len();
    let (star, codes, grad) = (&star[..n], &fisher.codes[..n], &mut grad[..n]);
    let out = |g: P, fd: f32| -> P {
        if ACC {
            P::put(g.get() + glam * fd)
        } else {
            P::put(glam * fd)
        }
    };
    let sub = fisher.block.min(BLOCK);
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let end = (start + sub).min(n);
        let b = start / fisher.block;
        let (lo, step) = (fisher.scales[2 * b], fisher.scales[2 * b + 1]);
        let mut lanes = [0f32; LANES];
        let mut i = start;
        while i + LANES <= end {
            let t: &[P; LANES] = theta[i..i + LANES].try_into().unwrap();
            let s: &[S; LANES] = star[i..i + LANES].try_into().unwrap();
            let q: &[u8; LANES] = codes[i..i + LANES].try_into().unwrap();
            let g: &mut [P; LANES] = (&mut grad[i..i + LANES]).try_into().unwrap();
            for l in 0..LANES {
                let f = fisher8::decode(q[l], lo, step);
                let d = t[l].get() - s[l].get();
                let fd = f * d;
                lanes[l] += fd * d;
                g[l] = out(g[l], fd);
            }
            i += LANES;
        }
        while i < end {
            let f = fisher8::decode(codes[i], lo, step);
            let d = theta[i].get() - star[i].get();
            let fd = f * d;
            lanes[0] += fd * d;
            grad[i] = out(grad[i], fd);
            i += 1;
        }
        total += lanes.iter().map(|&x| x as f64).sum::<f64>();
        start = end;
    }
    total
}

/// Whether this CPU runs the AVX2+FMA build of the loop (checked at run time, so one wheel
/// serves every x86-64 machine; in-cache passes run about twice as fast with it).
fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `block_sum` compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn block_sum_avx2<P: Elem, S: Elem, const ACC: bool>(
    theta: &[P],
    star: &[S],
    fisher: &[S],
    grad: &mut [P],
    glam: f32,
) -> f64 {
    block_sum::<P, S, ACC>(theta, star, fisher, grad, glam)
}

/// Lanes of the partial sums: lets the compiler vectorise the reduction, and keeps each f32
/// partial sum short (16 terms per lane per block) before it is added in f64.
const LANES: usize = 16;
const BLOCK: usize = 256;

#[inline(always)]
fn block_sum<P: Elem, S: Elem, const ACC: bool>(
    theta: &[P],
    star: &[S],
    fisher: &[S],
    grad: &mut [P],
    glam: f32,
) -> f64 {
    let n = theta.len();
    let (star, fisher, grad) = (&star[..n], &fisher[..n], &mut grad[..n]);
    let out = |g: P, fd: f32| -> P {
        if ACC {
            P::put(g.get() + glam * fd)
        } else {
            P::put(glam * fd)
        }
    };
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let mut lanes = [0f32; LANES];
        let mut i = start;
        // Fixed-size arrays without bounds checks inside: the shape the auto-vectoriser wants.
        while i + LANES <= end {
            let t: &[P; LANES] = theta[i..i + LANES].try_into().unwrap();
            let s: &[S; LANES] = star[i..i + LANES].try_into().unwrap();
            let f: &[S; LANES] = fisher[i..i + LANES].try_into().unwrap();
            let g: &mut [P; LANES] = (&mut grad[i..i + LANES]).try_into().unwrap();
            for l in 0..LANES {
                let d = t[l].get() - s[l].get();
                let fd = f[l].get() * d;
                lanes[l] += fd * d;
                g[l] = out(g[l], fd);
            }
            i += LANES;
        }
        while i < end {
            let d = theta[i].get() - star[i].get();
            let fd = fisher[i].get() * d;
            lanes[0] += fd * d;
            grad[i] = out(grad[i], fd);
            i += 1;
        }
        total += lanes.iter().map(|&x| x as f64).sum::<f64>();
        start = end;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_items_are_grouped_into_tasks_of_a_chunk() {
        let buf = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
        let at = Addr::of(&buf);
        let target = Target {
            param: at,
            grad: at,
            write: GradWrite::Overwrite,
            block: 0,
        };
        let mut items = Vec::new();
        for i in 0..10 {
            push_items(&mut items, target, (i * 10_000, 10_000), 4, 0);
        }
        push_items(&mut items, target, (100_000, 3 * CHUNK + 5), 4, 0);
        let t = tasks(&items);
        // every item in exactly one task, in order
        let covered: Vec<usize> = t.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..items.len()).collect::<Vec<_>>());
        assert!(t.len() < items.len(), "small items were not grouped: {t:?}");
    }

    #[test]
    fn add_adds_and_overwrite_overwrites() {
        let theta = [1.0f32; 40];
        let star = [0.5f32; 40];
        let fisher = [2.0f32; 40];
        let mut g = [10.0f32; 40];
        let sum = block_sum::<f32, f32, true>(&theta, &star, &fisher, &mut g, 3.0);
        assert!((sum - 40.0 * 2.0 * 0.25).abs() < 1e-9);
        assert!(g
            .iter()
            .all(|&x| (x - (10.0 + 3.0 * 2.0 * 0.5)).abs() < 1e-6));
        block_sum::<f32, f32, false>(&theta, &star, &fisher, &mut g, 3.0);
        assert!(g.iter().all(|&x| (x - 3.0).abs() < 1e-6));
    }
}
