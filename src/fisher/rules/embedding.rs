//! `nn.Embedding`: the per-sample gradient of the table is g scattered into the rows the sample
//! looked up; rows a sample uses several times get the sum of their gradients (before squaring).
//! The row `padding_idx` never receives a gradient.

use super::Slots;
use crate::error::{Context, Result};
use tch::{Kind, Tensor};

/// Flattens indices `[N, ...]` and gradients `[N, ..., D]` to (sample, row, gradient) triples,
/// dropping the padding row.
fn flat_rows(idx: &Tensor, g: &Tensor, padding_idx: Option<i64>) -> (Tensor, Tensor, Tensor) {
    let n = idx.size()[0];
    let d = *g.size().last().unwrap_or(&1);
    let per = (idx.numel() as i64) / n.max(1);
    let rows = idx.reshape([-1]).to_kind(Kind::Int64);
    let sample = Tensor::arange(n, (Kind::Int64, idx.device())).repeat_interleave_self_int(
        per,
        0,
        None::<i64>,
    );
    let grads = g.reshape([-1, d]);
    match padding_idx {
        Some(p) => {
            let keep = rows.ne(p);
            (
                rows.masked_select(&keep),
                sample.masked_select(&keep),
                grads.index_select(0, &keep.nonzero().squeeze_dim(1)),
            )
        }
        None => (rows, sample, grads),
    }
}

/// Σ_n (per-sample table gradient)², without materialising `[N, V, D]`: gradients are summed per
/// distinct (sample, row) pair, squared, and added into their row.
pub fn sum_sq(idx: &Tensor, g: &Tensor, num: i64, padding_idx: Option<i64>) -> Result<Slots> {
    let d = *g.size().last().unwrap_or(&1);
    let (rows, sample, grads) = flat_rows(idx, g, padding_idx);
    let key = &sample * num + &rows;
    let (uniq, inverse, _) = key
        .f_internal_unique2(false, true, false)
        .ctx("embedding rule (unique)")?;
    let m = uniq.size()[0];
    let summed = Tensor::zeros([m, d], (Kind::Float, g.device()))
        .f_index_add(0, &inverse, &grads)
        .ctx("embedding rule (index_add)")?;
    let row_of = uniq.remainder(num);
    let out = Tensor::zeros([num, d], (Kind::Float, g.device()))
        .f_index_add(0, &row_of, &summed.square())
        .ctx("embedding rule (index_add)")?;
    Ok([Some(out), None])
}

/// Dense per-sample gradients `[n, V, D]` (only used when the table is shared with other layers).
pub fn per_sample(
    idx: &Tensor,
    g: &Tensor,
    num: i64,
    padding_idx: Option<i64>,
    _want: [bool; 2],
) -> Result<Slots> {
    let n = idx.size()[0];
    let d = *g.size().last().unwrap_or(&1);
    let (rows, sample, grads) = flat_rows(idx, g, padding_idx);
    let out = Tensor::zeros([n * num, d], (Kind::Float, g.device()))
        .f_index_add(0, &(sample * num + rows), &grads)
        .ctx("embedding rule (index_add)")?;
    Ok([Some(out.reshape([n, num, d])), None])
}
