//! Per-tensor statistics of a Fisher: count, sum, mean, max, quantiles and a log-scale histogram,
//! one tensor at a time (one float32 copy of it, for the exact quantiles).

use crate::error::{value_err, Context, Result};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// The statistics of a list of tensors, one row per tensor.
pub struct Summary {
    pub count: Vec<i64>,
    pub sum: Vec<f64>,
    pub max: Vec<f64>,
    /// Row-major, `count.len()` × `levels.len()`: quantiles with linear interpolation (as
    /// `torch.quantile`'s default).
    pub quantiles: Vec<f64>,
    /// Row-major, `count.len()` × (`edges.len()` + 1): values below `edges[0]` (zeros too), in
    /// `[edges[k], edges[k+1])`, and from `edges[-1]` on.
    pub histogram: Vec<i64>,
}

/// The bin of `v` (see `Summary::histogram`).
fn bin(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|e| *e <= v)
}

/// The statistics of `tensors` (any float dtype and device), quantiles at `levels` (each in
/// [0, 1]) and a histogram over `edges` (increasing).
pub fn summarize(tensors: &[Tensor], levels: &[f64], edges: &[f64]) -> Result<Summary> {
    if let Some(q) = levels.iter().find(|q| !(0.0..=1.0).contains(*q)) {
        return value_err(format!(
            "levels: expected quantile levels in [0, 1], got {q}"
        ));
    }
    if edges.is_empty()
        || edges.windows(2).any(|w| w[0] >= w[1])
        || edges.iter().any(|e| !e.is_finite())
    {
        return value_err("edges: expected finite, strictly increasing histogram edges");
    }
    let bins = edges.len() + 1;
    let mut s = Summary {
        count: Vec::new(),
        sum: Vec::new(),
        max: Vec::new(),
        quantiles: Vec::new(),
        histogram: Vec::new(),
    };
    for (i, t) in tensors.iter().enumerate() {
        if !t.is_floating_point() {
            return value_err(format!(
                "tensors[{i}]: expected a floating-point tensor, got {:?}",
                t.kind()
            ));
        }
        let flat = t
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_to_kind(Kind::Float))
            .and_then(|t| t.f_flatten(0, -1))
            .ctx("fisher summary (read tensor)")?;
        let mut values = Vec::<f32>::try_from(&flat).ctx("fisher summary (copy tensor)")?;
        drop(flat);
        let (sum, max, hist) = values
            .par_chunks(1 << 16)
            .map(|c| {
                let mut h = vec![0i64; bins];
                let (mut sum, mut max) = (0.0f64, f64::NEG_INFINITY);
                for &v in c {
                    let v = v as f64;
                    sum += v;
                    max = max.max(v);
                    h[bin(edges, v)] += 1;
                }
                (sum, max, h)
            })
            .reduce(
                || (0.0, f64::NEG_INFINITY, vec![0i64; bins]),
                |(s1, m1, mut h1), (s2, m2, h2)| {
                    h1.iter_mut().zip(h2).for_each(|(a, b)| *a += b);
                    (s1 + s2, m1.max(m2), h1)
                },
            );
        let n = values.len();
        s.count.push(n as i64);
        s.sum.push(sum);
        s.max.push(if n == 0 { f64::NAN } else { max });
        s.histogram.extend(hist);
        for &q in levels {
            s.quantiles.push(quantile(&mut values, q));
        }
    }
    Ok(s)
}

/// The `q` quantile of `values` with linear interpolation between the order statistics around
/// q·(n−1); reorders `values`. NaN for an empty slice.
fn quantile(values: &mut [f32], q: f64) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let pos = q * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let (_, lo_value, above) = values.select_nth_unstable_by(lo, f32::total_cmp);
    let lo_value = *lo_value as f64;
    if lo + 1 >= n || pos == lo as f64 {
        return lo_value;
    }
    let hi_value = above.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    lo_value + (hi_value - lo_value) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_equal_libtorch_on_random_tensors() {
        tch::manual_seed(11);
        let a = Tensor::rand([1000, 3], (Kind::Float, Device::Cpu)).pow_tensor_scalar(6.0);
        let b = Tensor::rand([7], (Kind::Double, Device::Cpu));
        let levels = [0.0, 0.25, 0.5, 0.9, 1.0];
        let edges = [1e-6, 1e-3, 1e-1];
        let s = summarize(&[a.shallow_clone(), b.shallow_clone()], &levels, &edges).unwrap();
        assert_eq!(s.count, vec![3000, 7]);
        for (i, t) in [a, b.to_kind(Kind::Float)].iter().enumerate() {
            let t = t.to_kind(Kind::Double).flatten(0, -1);
            assert!(
                (s.sum[i] - t.sum(Kind::Double).double_value(&[])).abs() < 1e-6 * s.sum[i].max(1.0)
            );
            assert_eq!(s.max[i], t.max().double_value(&[]));
            for (k, q) in levels.iter().enumerate() {
                let want = t
                    .quantile_scalar(*q, None, false, "linear")
                    .double_value(&[]);
                assert!(
                    (s.quantiles[i * levels.len() + k] - want).abs() < 1e-7,
                    "q {q}"
                );
            }
            let hist = &s.histogram[i * 4..(i + 1) * 4];
            let below = t.lt(edges[0]).sum(Kind::Int64).int64_value(&[]);
            let top = t.ge(edges[2]).sum(Kind::Int64).int64_value(&[]);
            assert_eq!((hist[0], hist[3]), (below, top));
            assert_eq!(hist.iter().sum::<i64>(), t.numel() as i64);
        }
    }

    #[test]
    fn bad_levels_and_edges_are_refused() {
        let t = [Tensor::zeros([2], (Kind::Float, Device::Cpu))];
        assert!(summarize(&t, &[1.5], &[1.0]).is_err());
        assert!(summarize(&t, &[0.5], &[1.0, 1.0]).is_err());
        assert!(summarize(&t, &[0.5], &[]).is_err());
        let ints = [Tensor::zeros([2], (Kind::Int64, Device::Cpu))];
        assert!(summarize(&ints, &[0.5], &[1.0]).is_err());
    }
}
