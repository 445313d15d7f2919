//! Linear layers: y = a Wᵀ + b (`nn.Linear`, W `[out, in]`) and y = a W + b (Hugging Face
//! transformers' `Conv1D`, GPT-2's linear layer, W `[in, out]`), with any number of dims between
//! the sample dim and the features. One rule; the weight's layout is its only setting.

use super::{sum_middle, KfacForm, Rule, Slots, Want};
use crate::error::{Context, Result};
use crate::fisher::chunks::{chunks, Workspace, CHUNK, RESULT};
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

    /// `[n, T, in]` and `[n, T, out]` views of a call's input and output gradient, in float32,
    /// and the weight's `(rows, cols)` in its layout.
    fn as_sequences(&self, a: &Tensor, g: &Tensor) -> (Tensor, Tensor, [i64; 2]) {
        let n = a.size()[0];
        let fin = *a.size().last().unwrap_or(&1);
        let fout = *g.size().last().unwrap_or(&1);
        let a3 = a.to_kind(Kind::Float).reshape([n, -1, fin]);
        let g3 = g.to_kind(Kind::Float).reshape([n, -1, fout]);
        let dims = match self.layout {
            WeightLayout::OutIn => [fout, fin],
            WeightLayout::InOut => [fin, fout],
        };
        (a3, g3, dims)
    }

    /// The per-sample weight gradients of a chunk written into `out` `[len, rows, cols]`
    /// (`add`: added to what `out` holds).
    fn weight_product_into(
        &self,
        out: &mut Tensor,
        g3: &Tensor,
        a3: &Tensor,
        add: bool,
    ) -> Result<()> {
        let (left, right) = match self.layout {
            WeightLayout::OutIn => (g3, a3),
            WeightLayout::InOut => (a3, g3),
        };
        let left = left.transpose(-2, -1);
        if add {
            let _ = out.f_baddbmm_(&left, right).ctx("linear rule (baddbmm)")?;
        } else {
            let _ = left.f_bmm_out(out, right).ctx("linear rule (bmm)")?;
        }
        Ok(())
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

    /// Sequences `[N, T, in]`: per chunk, the per-sample weight gradients are written by one
    /// batched GEMM into a workspace buffer, squared in place and summed over the chunk (a single
    /// sample is squared straight into the running sum, itself a workspace buffer): no buffer of
    /// the weight's size is allocated per chunk or per call.
    fn sum_sq(&self, a: &Tensor, g: &Tensor, want: Want, ws: &Workspace) -> Result<Slots> {
        if self.is_outer_product(a) {
            return self.outer_product_sum_sq(a, &g.to_kind(Kind::Float).square(), want);
        }
        let n = a.size()[0];
        let (a3, g3, [rows, cols]) = self.as_sequences(a, g);
        let mut w: Option<Tensor> = None;
        if want.weight {
            let chunk = sequence_chunk(rows * cols, ws.budget, n);
            for (start, len) in chunks(n, chunk) {
                let mut buf = ws.buffer(CHUNK, &[len, rows, cols], a.device());
                self.weight_product_into(
                    &mut buf,
                    &g3.narrow(0, start, len),
                    &a3.narrow(0, start, len),
                    false,
                )?;
                let mut acc = match w.take() {
                    Some(acc) => acc,
                    None => ws.buffer(RESULT, &[rows, cols], a.device()).zero_(),
                };
                if len == 1 {
                    let one = buf.get(0);
                    let _ = acc.f_addcmul_(&one, &one).ctx("linear rule (addcmul)")?;
                } else {
                    let _ = buf.f_square_().ctx("linear rule (square)")?;
                    let sum = buf.sum_dim_intlist(0, false, Kind::Float);
                    let _ = acc.f_add_(&sum).ctx("linear rule (sum)")?;
                }
                w = Some(acc);
            }
        }
        let b = want.bias.then(|| {
            sum_middle(&g3, 1)
                .square()
                .sum_dim_intlist(0, false, Kind::Float)
        });
        Ok([w, b])
    }

    /// One GEMM over every row of the call (the batch weight gradient).
    fn summed(&self, a: &Tensor, g: &Tensor, want: Want, _ws: &Workspace) -> Result<Slots> {
        let fin = *a.size().last().unwrap_or(&1);
        let fout = *g.size().last().unwrap_or(&1);
        let g2 = g.to_kind(Kind::Float).reshape([-1, fout]);
        let w = if want.weight {
            Some(self.weight_product(&g2, &a.to_kind(Kind::Float).reshape([-1, fin]))?)
        } else {
            None
        };
        let b = want.bias.then(|| g2.sum_dim_intlist(0, false, Kind::Float));
        Ok([w, b])
    }

    /// The weight's per-sample gradients by one batched GEMM, into a fresh workspace buffer or
    /// added in place into the entry another call of the shared weight made.
    fn accumulate_per_sample(
        &self,
        acc: &mut Slots,
        a: &Tensor,
        g: &Tensor,
        want: Want,
        fresh: &dyn Fn(&[i64]) -> Tensor,
    ) -> Result<()> {
        let (a3, g3, [rows, cols]) = self.as_sequences(a, g);
        if want.weight {
            match &mut acc[0] {
                Some(w) => self.weight_product_into(w, &g3, &a3, true)?,
                None => {
                    let mut w = fresh(&[a3.size()[0], rows, cols]);
                    self.weight_product_into(&mut w, &g3, &a3, false)?;
                    acc[0] = Some(w);
                }
            }
        }
        if want.bias {
            let b = sum_middle(&g3, 1);
            acc[1] = Some(match acc[1].take() {
                Some(t) => t + b,
                None => b,
            });
        }
        Ok(())
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

/// A per-sample weight gradient of at least this many elements (4 MiB in float32) is one GEMM big
/// enough on its own (an LM head's, 32000 × 512, is 16M): such a layer goes one sample at a time,
/// squared straight into the running sum by one fused `addcmul_`. A chunk of several samples would
/// gain nothing in the GEMM and move more bytes (write the chunk, square it, sum it, add the sum),
/// and its buffer would be several weights' size (four LM heads, 256 MiB, on the Llama-shaped model
/// of `benchmarks/bench_llm.py`, where going one sample at a time lowered the Fisher's peak memory
/// from 1.64× to 1.39× a forward+backward's).
const ONE_SAMPLE_ELEMS: i64 = 1 << 20;

/// Samples per chunk of a sequence Linear's per-sample weight gradients (`elems` each): one for a
/// big weight (`ONE_SAMPLE_ELEMS`), else as many as `budget` bytes hold, at least one, at most `n`.
fn sequence_chunk(elems: i64, budget: i64, n: i64) -> i64 {
    if elems >= ONE_SAMPLE_ELEMS {
        return 1;
    }
    (budget / (4 * elems).max(1)).clamp(1, n.max(1))
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
            let fast = rule
                .sum_sq(&a2, &g2, Want::BOTH, &Workspace::new(1 << 20))
                .unwrap();
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

    #[test]
    fn big_weights_go_one_sample_at_a_time_small_ones_by_budget() {
        assert_eq!(sequence_chunk(32000 * 512, 256 << 20, 8), 1);
        assert_eq!(sequence_chunk(ONE_SAMPLE_ELEMS, 256 << 20, 8), 1);
        assert_eq!(sequence_chunk(ONE_SAMPLE_ELEMS - 1, 256 << 20, 8), 8);
        assert_eq!(sequence_chunk(1000, 8000, 8), 2);
        assert_eq!(sequence_chunk(1000, 1, 8), 1);
        assert_eq!(sequence_chunk(10, 1 << 20, 0), 1);
    }

    #[test]
    fn sequence_sum_sq_of_a_big_weight_matches_autograd() {
        // 1024 × 1024 = ONE_SAMPLE_ELEMS: the one-sample path, against per-sample autograd.
        tch::manual_seed(14);
        let (n, t, d) = (3, 4, 1024);
        let w = Tensor::randn([d, d], OPTS).set_requires_grad(true);
        let a = Tensor::randn([n, t, d], OPTS);
        let g = Tensor::randn([n, t, d], OPTS);
        let ws = Workspace::new(256 << 20);
        let [got, _] = LINEAR.sum_sq(&a, &g, Want::WEIGHT, &ws).unwrap();
        let mut want = w.zeros_like();
        for i in 0..n {
            let wi = w.detach().set_requires_grad(true);
            let out = a.get(i).matmul(&wi.tr());
            let li = (out * g.get(i)).sum(Kind::Float);
            let gw = &Tensor::run_backward(&[li], &[&wi], false, false)[0];
            want += gw.square();
        }
        let got = got.unwrap();
        assert!(rel(&got, &want) < 1e-5, "{}", rel(&got, &want));
    }
}
