//! Categorical likelihoods with several positions per sample: logits `[N, P, C]` and targets
//! `[N, P]` (sequences under teacher forcing, or segmentation maps, laid out so by the Python
//! side), positions whose target is `ignore_index` left out.
//!
//! A sample's log-likelihood is the sum over its positions, ℓ_n = Σ_p log p(y_np | x_n), and the
//! Fisher stays per sample: F = (1/N) Σ_n (∇ℓ_n)². Given the input, the positions' labels are
//! independent, so E_y[(∇ℓ_n)²] = Σ_p Σ_c p(c|n,p) (∇ log p(c|n,p))² (cross terms vanish):
//! `exact` needs one root per (position, class) pair.

use super::{check_integer, check_range, need, FisherKind, RootSpec};
use crate::error::{value_err, Context, Result};
use tch::{Kind, Tensor};

/// `exact` runs one backward pass per (position, class) pair; beyond this many it is refused.
pub const EXACT_MAX_PAIRS: i64 = 1024;

/// The roots for logits `[N, P, C]`.
pub fn roots(spec: &RootSpec, out: &Tensor) -> Result<Vec<Tensor>> {
    let (n, p, c) = (out.size()[0], out.size()[1], out.size()[2]);
    let logp = out
        .to_kind(Kind::Float)
        .f_log_softmax(2, Kind::Float)
        .ctx("log_softmax")?;
    // Which positions count (all when there are no targets, e.g. `exact` on unlabelled data).
    let mask = match spec.targets.as_ref() {
        Some(y) => Some(position_mask(y, [n, p, c], spec.ignore_index)?),
        None => None,
    };
    let masked = |t: Tensor| match &mask {
        Some(m) => t * m,
        None => t,
    };
    Ok(match spec.kind {
        FisherKind::Empirical | FisherKind::Batched => {
            let y = need(spec.targets.as_ref(), "targets")?;
            let labels = y.to_kind(Kind::Int64).clamp_min(0).unsqueeze(2);
            let ll = logp
                .f_gather(2, &labels, false)
                .ctx("gather log-probabilities")?
                .squeeze_dim(2);
            let per_sample = masked(ll).sum_dim_intlist(1, false, Kind::Float);
            if spec.kind == FisherKind::Batched {
                vec![-per_sample.mean(Kind::Float)]
            } else {
                vec![per_sample.sum(Kind::Float)]
            }
        }
        FisherKind::Exact => {
            if p * c > EXACT_MAX_PAIRS {
                return value_err(format!(
                    "kind: 'exact' needs one backward pass per (position, class) pair, here \
                     {p} positions × {c} classes = {} > {EXACT_MAX_PAIRS}; use kind='mc' (one \
                     pass per draw) or kind='empirical'",
                    p * c
                ));
            }
            let weight = match &mask {
                Some(m) => logp.detach().exp().sqrt() * m.unsqueeze(2),
                None => logp.detach().exp().sqrt(),
            };
            let mut roots = Vec::with_capacity((p * c) as usize);
            for t in 0..p {
                let (lp, w) = (logp.select(1, t), weight.select(1, t));
                for k in 0..c {
                    roots.push((lp.select(1, k) * w.select(1, k)).sum(Kind::Float));
                }
            }
            roots
        }
        FisherKind::Mc => {
            let draws = need(spec.mc_draws.as_ref(), "mc_draws")?;
            if draws.dim() != 3 || draws.size()[..2] != [n, p] {
                return value_err(format!(
                    "mc_draws: expected shape [{n}, {p}, S] (a label per position and draw), got {:?}",
                    draws.size()
                ));
            }
            check_range(draws, c, "mc_draws", "")?;
            let s = draws.size()[2];
            let ll = logp
                .f_gather(2, &draws.to_kind(Kind::Int64), false)
                .ctx("gather mc labels")?;
            let ll = match &mask {
                Some(m) => ll * m.unsqueeze(2),
                None => ll,
            };
            let scale = 1.0 / (s as f64).sqrt();
            (0..s)
                .map(|k| ll.select(2, k).sum(Kind::Float) * scale)
                .collect()
        }
    })
}

/// Checks targets `[N, P]` against logits `[N, P, C]` and returns the float mask of the
/// positions that count (target ≠ `ignore_index`); every sample needs at least one.
fn position_mask(y: &Tensor, [n, p, c]: [i64; 3], ignore_index: i64) -> Result<Tensor> {
    check_integer(y, "targets")?;
    if y.size() != [n, p] {
        return value_err(format!(
            "targets: expected shape [{n}, {p}] (one label per position of the logits [{n}, {p}, \
             {c}]), got {:?}",
            y.size()
        ));
    }
    let keep = y.ne(ignore_index);
    let counted = keep.sum_dim_intlist(1, false, Kind::Int64);
    if n > 0 && counted.min().int64_value(&[]) == 0 {
        let first = counted.eq(0).nonzero().int64_value(&[0, 0]);
        return value_err(format!(
            "targets: sample {first} has every position equal to ignore_index={ignore_index}, so it \
             has no log-likelihood; drop such samples from the loader"
        ));
    }
    check_range(
        &y.masked_select(&keep),
        c,
        "targets",
        " (or equal ignore_index)",
    )?;
    Ok(keep.to_kind(Kind::Float))
}
