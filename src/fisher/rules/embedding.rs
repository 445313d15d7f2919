//! `nn.Embedding`: the per-sample gradient of the table is g scattered into the rows the sample
//! looked up; rows a sample uses several times get the sum of their gradients (before squaring).
//! The row `padding_idx` never receives a gradient.

use super::{Rule, Slots, Want};
use crate::error::{Context, Result};
use crate::fisher::chunks::{Workspace, RESULT};
use pyo3::prelude::*;
use std::sync::Arc;
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct Embedding {
    pub num_embeddings: i64,
    pub padding_idx: Option<i64>,
}

/// `None` for `max_norm` (renormalises the table inside forward) and `scale_grad_by_freq`
/// (couples the samples of a batch).
pub fn from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    if !m.getattr("max_norm")?.is_none() || m.getattr("scale_grad_by_freq")?.extract::<bool>()? {
        return Ok(None);
    }
    Ok(Some(Arc::new(Embedding {
        num_embeddings: m.getattr("num_embeddings")?.extract()?,
        padding_idx: m.getattr("padding_idx")?.extract()?,
    })))
}

/// The looked-up rows as `(row, sample, gradient)`: indices `[N, ...]` and gradients
/// `[N, ..., D]` flattened, the padding row dropped.
struct Lookups {
    rows: Tensor,
    sample: Tensor,
    grads: Tensor,
}

impl Embedding {
    fn lookups(&self, idx: &Tensor, g: &Tensor) -> Lookups {
        let n = idx.size()[0];
        let d = *g.size().last().unwrap_or(&1);
        let per = (idx.numel() as i64) / n.max(1);
        let rows = idx.reshape([-1]).to_kind(Kind::Int64);
        let sample = Tensor::arange(n, (Kind::Int64, idx.device())).repeat_interleave_self_int(
            per,
            0,
            None::<i64>,
        );
        let grads = g.to_kind(Kind::Float).reshape([-1, d]);
        match self.padding_idx {
            Some(p) => {
                let keep = rows.ne(p);
                Lookups {
                    rows: rows.masked_select(&keep),
                    sample: sample.masked_select(&keep),
                    grads: grads.index_select(0, &keep.nonzero().squeeze_dim(1)),
                }
            }
            None => Lookups {
                rows,
                sample,
                grads,
            },
        }
    }
}

impl Rule for Embedding {
    /// Dense per-sample gradients `[n, V, D]` (only used when the table is shared with other
    /// layers, or for the rule check).
    fn per_sample(&self, idx: &Tensor, g: &Tensor, _want: Want) -> Result<Slots> {
        let n = idx.size()[0];
        let d = *g.size().last().unwrap_or(&1);
        let num = self.num_embeddings;
        let l = self.lookups(idx, g);
        let out = Tensor::zeros([n * num, d], (Kind::Float, g.device()))
            .f_index_add(0, &(l.sample * num + l.rows), &l.grads)
            .ctx("embedding rule (index_add)")?;
        Ok([Some(out.reshape([n, num, d])), None])
    }

    fn per_sample_elems(&self, _a: &Tensor, g: &Tensor) -> i64 {
        self.num_embeddings * g.size().last().copied().unwrap_or(1)
    }

    /// Σ_n (per-sample table gradient)², without materialising `[N, V, D]`: gradients are summed
    /// per distinct (sample, row) pair, squared, and added into their row.
    fn sum_sq(&self, idx: &Tensor, g: &Tensor, _want: Want, ws: &Workspace) -> Result<Slots> {
        let d = *g.size().last().unwrap_or(&1);
        let num = self.num_embeddings;
        let l = self.lookups(idx, g);
        let key = &l.sample * num + &l.rows;
        let (uniq, inverse, _) = key
            .f_internal_unique2(false, true, false)
            .ctx("embedding rule (unique)")?;
        let summed = Tensor::zeros([uniq.size()[0], d], (Kind::Float, g.device()))
            .f_index_add(0, &inverse, &l.grads)
            .ctx("embedding rule (index_add)")?;
        // The table-sized result in the workspace: no fresh [V, D] per batch.
        let mut out = ws.buffer(RESULT, &[num, d], g.device()).zero_();
        let _ = out
            .f_index_add_(0, &uniq.remainder(num), &summed.square())
            .ctx("embedding rule (index_add)")?;
        Ok([Some(out), None])
    }

    /// Every lookup's gradient added into its row: the table's batch gradient.
    fn summed(&self, idx: &Tensor, g: &Tensor, _want: Want, _ws: &Workspace) -> Result<Slots> {
        let d = *g.size().last().unwrap_or(&1);
        let l = self.lookups(idx, g);
        let out = Tensor::zeros([self.num_embeddings, d], (Kind::Float, g.device()))
            .f_index_add(0, &l.rows, &l.grads)
            .ctx("embedding rule (index_add)")?;
        Ok([Some(out), None])
    }

    /// Into an entry another call made (a tied LM head's per-sample gradients), the lookups are
    /// added in place, row by row: only the sequence's tokens are touched.
    fn accumulate_per_sample(
        &self,
        acc: &mut Slots,
        idx: &Tensor,
        g: &Tensor,
        want: Want,
        _fresh: &dyn Fn(&[i64]) -> Tensor,
    ) -> Result<()> {
        let num = self.num_embeddings;
        match &mut acc[0] {
            Some(w) => {
                if !w.is_contiguous() {
                    *w = w.contiguous();
                }
                let d = *g.size().last().unwrap_or(&1);
                let l = self.lookups(idx, g);
                let mut rows = w.view([-1, d]);
                let _ = rows
                    .f_index_add_(0, &(l.sample * num + l.rows), &l.grads)
                    .ctx("embedding rule (index_add_)")?;
            }
            None => acc[0] = self.per_sample(idx, g, want)?[0].take(),
        }
        Ok(())
    }

    fn sparse_per_sample(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::rel;
    use super::*;

    #[test]
    fn sum_of_squares_sums_repeated_rows_before_squaring() {
        // Sample 0 looks up row 2 twice: its per-sample gradient for row 2 is g₀ + g₁.
        let idx = Tensor::from_slice(&[2i64, 2, 0, 1]).reshape([2, 2]);
        let g = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0]).reshape([2, 2, 1]);
        let rule = Embedding {
            num_embeddings: 3,
            padding_idx: Some(0),
        };
        let sq = rule
            .sum_sq(&idx, &g, Want::WEIGHT, &Workspace::new(1 << 20))
            .unwrap();
        let got: Vec<f32> = Vec::try_from(sq[0].as_ref().unwrap().reshape([-1])).unwrap();
        // row 0 is padding (no gradient), row 1: 4² from sample 1, row 2: (1+2)² from sample 0.
        assert_eq!(got, vec![0.0, 16.0, 9.0]);
        let dense = rule.per_sample(&idx, &g, Want::WEIGHT).unwrap();
        let dense_sq = dense[0]
            .as_ref()
            .unwrap()
            .square()
            .sum_dim_intlist(0, false, Kind::Float);
        assert!(rel(&dense_sq, sq[0].as_ref().unwrap()) < 1e-6);
    }
}
