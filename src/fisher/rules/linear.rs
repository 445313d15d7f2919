//! Linear layers: y = a Wᵀ + b (`nn.Linear`, W `[out, in]`) and y = a W + b (Hugging Face
//! transformers' `Conv1D`, GPT-2's linear layer, W `[in, out]`), with any number of dims between
//! the sample dim and the features. One rule; the weight's layout is its only setting.

use super::{sum_middle, KfacForm, Rule, Slots, Want};
use crate::error::{Context, Result};
use pyo3::prelude::*;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// How the weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`, as `nn.Linear`.
    OutIn,
    /// `[in, out]`, as transformers' `Conv1D`.
    InOut,
}

#[derive(Debug)]
pub struct Linear {
    pub layout: WeightLayout,
}

pub const LINEAR: Linear = Linear {
    layout: WeightLayout::OutIn,
};
pub const CONV1D: Linear = Linear {
    layout: WeightLayout::InOut,
};

/// `nn.Linear`: every instance is covered.
pub fn from_module(_m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(LINEAR)))
}

/// transformers' `Conv1D`: its forward is `addmm(bias, a, weight)`, with no settings.
pub fn from_hf_conv1d(_m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    Ok(Some(Arc::new(CONV1D)))
}

impl Linear {
    /// `gᵀ a` (`[.., out, in]`) or `aᵀ g` (`[.., in, out]`): the weight gradient in the weight's
    /// layout, per sample for 3-d operands, summed over the rows for 2-d ones.
    fn weight_product(&self, g: &Tensor, a: &Tensor) -> Result<Tensor> {
        let (left, right) = match self.layout {
            WeightLayout::OutIn => (g, a),
            WeightLayout::InOut => (a, g),
        };
        left.f_transpose(-2, -1)
            .and_then(|t| t.f_matmul(right))
            .ctx("linear rule")
    }
}

impl Rule for Linear {
    /// `[N, ..., in]`: the per-sample gradient of W is Σ_t g_nt a_ntᵀ (a batched matmul), in the
    /// weight's layout; that of b is Σ_t g_nt.
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        let n = a.size()[0];
        let fin = *a.size().last().unwrap_or(&1);
        let fout = *g.size().last().unwrap_or(&1);
        let g = g.to_kind(Kind::Float);
        let w = if want.weight {
            let a3 = a.to_kind(Kind::Float).reshape([n, -1, fin]);
            Some(self.weight_product(&g.reshape([n, -1, fout]), &a3)?)
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
    /// g_n a_nᵀ, so Σ_n (g_n a_nᵀ)² = (g²)ᵀ(a²), in the weight's layout.
    fn outer_product_sum_sq(&self, a: &Tensor, g2: &Tensor, want: Want) -> Result<Slots> {
        let w = if want.weight {
            Some(self.weight_product(g2, &a.to_kind(Kind::Float).square())?)
        } else {
            None
        };
        let b = want.bias.then(|| g2.sum_dim_intlist(0, false, Kind::Float));
        Ok([w, b])
    }

    fn kfac_form(&self, weight_shape: &[i64]) -> Option<KfacForm> {
        let &[rows, cols] = weight_shape else {
            return None;
        };
        let transposed = self.layout == WeightLayout::InOut;
        let (inputs, outputs) = if transposed {
            (rows, cols)
        } else {
            (cols, rows)
        };
        Some(KfacForm {
            inputs,
            outputs,
            transposed,
        })
    }

    /// Every position of `[N, ..., in]` is a row (KFAC-expand).
    fn kfac_input_rows(&self, a: &Tensor) -> Result<Tensor> {
        let fin = *a.size().last().unwrap_or(&1);
        a.to_kind(Kind::Float)
            .f_reshape([-1, fin])
            .ctx("linear rule (KFAC input rows)")
    }

    fn kfac_grad_rows(&self, g: &Tensor) -> Result<Tensor> {
        let fout = *g.size().last().unwrap_or(&1);
        g.to_kind(Kind::Float)
            .f_reshape([-1, fout])
            .ctx("linear rule (KFAC gradient rows)")
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{autograd_per_sample, rel, OPTS};
    use super::*;
    use crate::fisher::driver::{Batch, FisherSums, LayerCall};

    #[test]
    fn per_sample_matches_autograd_with_extra_dims() {
        tch::manual_seed(1);
        let a = Tensor::randn([5, 3, 4], OPTS);
        let g = Tensor::randn([5, 3, 6], OPTS);
        let w = Tensor::randn([6, 4], OPTS);
        let want = autograd_per_sample(&a, &g, &w, |x, w| x.linear::<Tensor>(w, None));
        let got = LINEAR.per_sample(&a, &g, Want::WEIGHT).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);
    }

    /// Conv1D's forward, as transformers writes it: addmm on the flattened leading dims.
    fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let fin = *x.size().last().unwrap();
        let mut out_shape = x.size();
        *out_shape.last_mut().unwrap() = w.size()[1];
        b.addmm(&x.reshape([-1, fin]), w)
            .reshape(out_shape.as_slice())
    }

    #[test]
    fn conv1d_per_sample_matches_autograd_with_extra_dims() {
        tch::manual_seed(11);
        let a = Tensor::randn([5, 3, 4], OPTS);
        let g = Tensor::randn([5, 3, 6], OPTS);
        let w = Tensor::randn([4, 6], OPTS);
        let b = Tensor::randn([6], OPTS);
        let want_w = autograd_per_sample(&a, &g, &w, |x, w| conv1d(x, w, &b));
        let want_b = autograd_per_sample(&a, &g, &b, |x, b| conv1d(x, &w, b));
        let got = CONV1D.per_sample(&a, &g, Want::BOTH).unwrap();
        assert_eq!(got[0].as_ref().unwrap().size(), vec![5, 4, 6]);
        assert!(rel(got[0].as_ref().unwrap(), &want_w) < 1e-5);
        assert!(rel(got[1].as_ref().unwrap(), &want_b) < 1e-5);
    }

    #[test]
    fn gemm_form_equals_squared_per_sample_gradients_in_both_layouts() {
        tch::manual_seed(12);
        let a2 = Tensor::randn([7, 4], OPTS);
        let g2 = Tensor::randn([7, 6], OPTS);
        for rule in [LINEAR, CONV1D] {
            assert!(rule.is_outer_product(&a2));
            let fast = rule.sum_sq(&a2, &g2, Want::BOTH, 1 << 20).unwrap();
            let ps = rule.per_sample(&a2, &g2, Want::BOTH).unwrap();
            for (f, p) in fast.iter().zip(ps.iter()) {
                let slow = p
                    .as_ref()
                    .unwrap()
                    .square()
                    .sum_dim_intlist(0, false, Kind::Float);
                assert_eq!(f.as_ref().unwrap().size(), slow.size(), "{:?}", rule.layout);
                assert!(rel(f.as_ref().unwrap(), &slow) < 1e-5, "{:?}", rule.layout);
            }
        }
    }

    /// Through the driver, with several roots (their squared output gradients summed before the
    /// rule's GEMM) and a square weight, where a transposed result would keep its shape and only
    /// the numbers would tell: equals Σ_roots Σ_n (autograd's per-sample gradient)².
    #[test]
    fn driver_fast_path_keeps_the_in_out_layout() {
        tch::manual_seed(13);
        let (n, d) = (6, 5);
        let w = Tensor::randn([d, d], OPTS).set_requires_grad(true);
        let b = Tensor::randn([d], OPTS).set_requires_grad(true);
        let a = Tensor::randn([n, d], OPTS);
        let out = conv1d(&a, &w, &b);
        let logp = out.log_softmax(1, Kind::Float);
        let roots: Vec<Tensor> = (0..2).map(|c| logp.select(1, c).sum(Kind::Float)).collect();
        let sums = FisherSums::new(
            vec![w.detach(), b.detach()],
            vec!["w".into(), "b".into()],
            1 << 20,
        )
        .unwrap();
        let calls = [LayerCall {
            rule: Arc::new(CONV1D),
            input: a.shallow_clone(),
            output: out.shallow_clone(),
            slots: [Some(0), Some(1)],
            kfac: None,
        }];
        let batch = Batch {
            roots: roots.iter().map(Tensor::shallow_clone).collect(),
            calls: &calls,
            whole: &[],
            kfac: None,
        };
        sums.add_batch(&batch).unwrap();
        let mut want = [w.zeros_like(), b.zeros_like()];
        for i in 0..n {
            for c in 0..2 {
                let wi = w.detach().set_requires_grad(true);
                let bi = b.detach().set_requires_grad(true);
                let li = conv1d(&a.narrow(0, i, 1), &wi, &bi)
                    .log_softmax(1, Kind::Float)
                    .select(1, c)
                    .sum(Kind::Float);
                let grads = Tensor::run_backward(&[li], &[&wi, &bi], false, false);
                for (acc, g) in want.iter_mut().zip(grads) {
                    *acc = &*acc + g.square();
                }
            }
        }
        for (got, want) in sums.totals.iter().zip(want.iter()) {
            assert!(rel(got, want) < 1e-5, "{}", rel(got, want));
        }
    }
}
