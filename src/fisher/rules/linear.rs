//! `nn.Linear`: y = a Wᵀ + b, with any number of dims between the sample dim and the features.

use super::{sum_middle, Rule, Slots, Want};
use crate::error::{Context, Result};
use pyo3::prelude::*;
use std::sync::Arc;
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct Linear;

pub fn from_module(_m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(Linear)))
}

impl Rule for Linear {
    /// `[N, ..., in]`: the per-sample gradient of W is Σ_t g_nt a_ntᵀ (a batched matmul).
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        let n = a.size()[0];
        let fin = *a.size().last().unwrap_or(&1);
        let fout = *g.size().last().unwrap_or(&1);
        let g = g.to_kind(Kind::Float);
        let w = if want.weight {
            let a3 = a.to_kind(Kind::Float).reshape([n, -1, fin]);
            let g3 = g.reshape([n, -1, fout]);
            Some(
                g3.f_transpose(1, 2)
                    .and_then(|t| t.f_bmm(&a3))
                    .ctx("linear rule")?,
            )
        } else {
            None
        };
        let b = want.bias.then(|| sum_middle(&g, 1));
        Ok([w, b])
    }

    fn per_sample_elems(&self, a: &Tensor, g: &Tensor) -> i64 {
        let n = a.size()[0].max(1);
        let fin = a.size().last().copied().unwrap_or(1);
        let fout = g.size().last().copied().unwrap_or(1);
        fin * fout + (a.numel() as i64 + g.numel() as i64) / n
    }

    fn is_outer_product(&self, a: &Tensor) -> bool {
        a.dim() == 2
    }

    /// The one-GEMM form for 2-d inputs: the per-sample weight gradient is the outer product
    /// g_n a_nᵀ, so Σ_n (g_n a_nᵀ)² = (g²)ᵀ(a²), `[out, in]`.
    fn outer_product_sum_sq(&self, a: &Tensor, g2: &Tensor, want: Want) -> Result<Slots> {
        let w = if want.weight {
            let a2 = a.to_kind(Kind::Float).square();
            Some(g2.f_tr().and_then(|t| t.f_matmul(&a2)).ctx("linear rule")?)
        } else {
            None
        };
        let b = want.bias.then(|| g2.sum_dim_intlist(0, false, Kind::Float));
        Ok([w, b])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{autograd_per_sample, rel, OPTS};
    use super::*;

    #[test]
    fn per_sample_matches_autograd_with_extra_dims() {
        tch::manual_seed(1);
        let a = Tensor::randn([5, 3, 4], OPTS);
        let g = Tensor::randn([5, 3, 6], OPTS);
        let w = Tensor::randn([6, 4], OPTS);
        let want = autograd_per_sample(&a, &g, &w, |x, w| x.linear::<Tensor>(w, None));
        let got = Linear.per_sample(&a, &g, Want::WEIGHT).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);
    }

    #[test]
    fn gemm_form_equals_squared_per_sample_gradients() {
        tch::manual_seed(2);
        let a2 = Tensor::randn([7, 4], OPTS);
        let g2 = Tensor::randn([7, 6], OPTS);
        let fast = Linear.sum_sq(&a2, &g2, Want::BOTH, 1 << 20).unwrap();
        let ps = Linear.per_sample(&a2, &g2, Want::BOTH).unwrap();
        for (f, p) in fast.iter().zip(ps.iter()) {
            let slow = p
                .as_ref()
                .unwrap()
                .square()
                .sum_dim_intlist(0, false, Kind::Float);
            assert!(rel(f.as_ref().unwrap(), &slow) < 1e-5);
        }
    }
}
