//! The scalars ("roots") whose gradients give the Fisher, for each kind and likelihood.
//!
//! Every root except `batched`'s is a sum over samples of a term that depends on one sample only,
//! Σ_n w_n ℓ_n(θ), so the gradient of the root w.r.t. a layer's output holds every sample's own
//! gradient at once. The Fisher numerator is Σ_roots Σ_n (per-sample gradient)²:
//! - `empirical`: one root, ℓ_n = log p(y_n | x_n).
//! - `exact` (categorical): one root per class c with w_n = sqrt(p(c|x_n)) (detached), so the
//!   squares carry the weight p(c|x_n); (gaussian, unit variance): one root per output d, f_nd.
//! - `mc`: one root per draw s, weight 1/sqrt(S), labels (or noise) drawn by the caller.
//! - `batched`: the seed article's estimator, the batch-mean negative log-likelihood; the caller
//!   squares its full gradient (biased: ≈ 1/batch_size of the Fisher, opposite signs cancel).

mod sequence;

use crate::error::{value_err, Context, Result};
use tch::{Kind, Tensor};

pub use sequence::EXACT_MAX_PAIRS;

/// The default `ignore_index`, as in `torch.nn.functional.cross_entropy` and Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FisherKind {
    Exact,
    Mc,
    Empirical,
    Batched,
}

impl FisherKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "exact" => Self::Exact,
            "mc" => Self::Mc,
            "empirical" => Self::Empirical,
            "batched" => Self::Batched,
            other => {
                return value_err(format!(
                    "kind: expected one of 'exact', 'mc', 'empirical', 'batched', got {other:?}"
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Likelihood {
    /// Outputs are logits `[N, C]` with targets `[N]`, or `[N, P, C]` with targets `[N, P]`.
    Categorical,
    /// Outputs `[N, D]`, targets `[N, D]`, unit variance.
    Gaussian,
    /// The caller computed the per-sample log-likelihood `[N]` (connected to the graph).
    Custom,
}

impl Likelihood {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "categorical" => Self::Categorical,
            "gaussian" => Self::Gaussian,
            "custom" => Self::Custom,
            other => {
                return value_err(format!(
                    "likelihood: expected 'categorical', 'gaussian' or a callable, got {other:?}"
                ))
            }
        })
    }
}

/// What the roots are built from, besides the model's outputs: the kind, the likelihood, and
/// the tensors they need. Checked when built, so a malformed specification never reaches a
/// backward pass.
#[derive(Debug)]
pub struct RootSpec {
    pub kind: FisherKind,
    pub likelihood: Likelihood,
    /// Labels `[N]` (categorical) or regression targets `[N, D]` (gaussian).
    pub targets: Option<Tensor>,
    /// For `mc`: sampled labels `[N, S]` (categorical) or noise `[N, S, D]` (gaussian).
    pub mc_draws: Option<Tensor>,
    /// For `Likelihood::Custom`: the per-sample log-likelihood `[N]`, connected to the graph.
    pub loglik: Option<Tensor>,
    /// Target value of positions that do not count (per-position logits `[N, P, C]` only).
    pub ignore_index: i64,
}

impl RootSpec {
    pub fn new(
        kind: FisherKind,
        likelihood: Likelihood,
        targets: Option<Tensor>,
        mc_draws: Option<Tensor>,
        loglik: Option<Tensor>,
    ) -> Result<Self> {
        let spec = Self {
            kind,
            likelihood,
            targets,
            mc_draws,
            loglik,
            ignore_index: IGNORE_INDEX,
        };
        match (likelihood, kind) {
            (Likelihood::Custom, FisherKind::Exact | FisherKind::Mc) => {
                return value_err(format!(
                    "kind: {kind:?} needs to sample from the model's predictive distribution, \
                     which a callable likelihood does not define; use kind='empirical' or 'batched'"
                ))
            }
            (Likelihood::Custom, _) => need(spec.loglik.as_ref(), "loglik")?,
            (_, FisherKind::Mc) => need(spec.mc_draws.as_ref(), "mc_draws")?,
            (_, FisherKind::Empirical | FisherKind::Batched) => {
                need(spec.targets.as_ref(), "targets")?
            }
            (_, FisherKind::Exact) => return Ok(spec),
        };
        Ok(spec)
    }

    /// The same specification sharing its tensors (to hand to a thread without the GIL).
    pub fn shallow_clone(&self) -> Self {
        let share = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        Self {
            kind: self.kind,
            likelihood: self.likelihood,
            targets: share(&self.targets),
            mc_draws: share(&self.mc_draws),
            loglik: share(&self.loglik),
            ignore_index: self.ignore_index,
        }
    }

    /// Checks `outputs` and the tensors against the likelihood, then builds the roots.
    pub fn build(&self, outputs: &Tensor) -> Result<Vec<Tensor>> {
        match self.likelihood {
            Likelihood::Categorical => categorical(self, outputs),
            Likelihood::Gaussian => gaussian(self, outputs),
            Likelihood::Custom => custom(self, outputs),
        }
    }
}

fn need<'a>(t: Option<&'a Tensor>, what: &str) -> Result<&'a Tensor> {
    match t {
        Some(t) => Ok(t),
        None => value_err(format!(
            "{what}: required for this Fisher kind and likelihood"
        )),
    }
}

fn categorical(inp: &RootSpec, out: &Tensor) -> Result<Vec<Tensor>> {
    match out.dim() {
        2 => {}
        3 => return sequence::roots(inp, out),
        _ => {
            return value_err(format!(
                "model outputs: likelihood 'categorical' expects logits of shape [N, C], or \
                 [N, P, C] with a class per position, got {:?}",
                out.size()
            ))
        }
    }
    let (n, c) = (out.size()[0], out.size()[1]);
    let logp = out
        .to_kind(Kind::Float)
        .f_log_softmax(1, Kind::Float)
        .ctx("log_softmax")?;
    let labelled = |labels: &Tensor| -> Result<Tensor> {
        logp.f_gather(1, &labels.reshape([n, 1]), false)
            .ctx("gather log-probabilities")
    };
    Ok(match inp.kind {
        FisherKind::Empirical | FisherKind::Batched => {
            let y = need(inp.targets.as_ref(), "targets")?;
            check_labels(y, n, c)?;
            let ll = labelled(y)?;
            if inp.kind == FisherKind::Batched {
                vec![-ll.mean(Kind::Float)]
            } else {
                vec![ll.sum(Kind::Float)]
            }
        }
        FisherKind::Exact => {
            let p = logp.detach().exp();
            let mut roots = Vec::with_capacity(c as usize);
            for k in 0..c {
                let w = p.select(1, k).sqrt();
                roots.push((logp.select(1, k) * w).sum(Kind::Float));
            }
            roots
        }
        FisherKind::Mc => {
            let labels = need(inp.mc_draws.as_ref(), "mc_draws")?;
            if labels.dim() != 2 || labels.size()[0] != n {
                return value_err(format!(
                    "mc labels: expected shape [{n}, S], got {:?}",
                    labels.size()
                ));
            }
            check_labels(labels, labels.numel() as i64, c)?;
            let s = labels.size()[1];
            if s > c {
                return mc_by_class(&logp, labels, s);
            }
            let scale = 1.0 / (s as f64).sqrt();
            let ll = logp.f_gather(1, labels, false).ctx("gather mc labels")?;
            (0..s)
                .map(|k| ll.select(1, k).sum(Kind::Float) * scale)
                .collect()
        }
    })
}

/// `mc` with more draws than classes: draws of the same class give the same per-sample
/// gradient, so (1/S) Σ_s g(y_s)² = Σ_c (count_c / S) g(c)², one root per class drawn (at most C
/// backward passes instead of S), weighted like `exact` but with the draws' frequencies.
fn mc_by_class(logp: &Tensor, labels: &Tensor, s: i64) -> Result<Vec<Tensor>> {
    let counts = logp
        .zeros_like()
        .f_scatter_add(
            1,
            &labels.to_kind(Kind::Int64),
            &Tensor::ones(labels.size(), (Kind::Float, logp.device())),
        )
        .ctx("count mc draws per class")?;
    let weights = (&counts / (s as f64)).sqrt();
    let drawn = Vec::<f64>::try_from(
        counts
            .sum_dim_intlist(0, false, Kind::Float)
            .to_kind(Kind::Double),
    )
    .ctx("count mc draws per class")?;
    Ok(drawn
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0.0)
        .map(|(k, _)| (logp.select(1, k as i64) * weights.select(1, k as i64)).sum(Kind::Float))
        .collect())
}

fn check_labels(y: &Tensor, n: i64, c: i64) -> Result<()> {
    check_integer(y, "targets")?;
    if y.numel() as i64 != n {
        return value_err(format!(
            "targets: expected {n} labels (one per output row), got shape {:?}",
            y.size()
        ));
    }
    check_range(y, c, "targets", "")
}

/// Integer class labels, or a `ValueError` naming `what`.
fn check_integer(y: &Tensor, what: &str) -> Result<()> {
    if !matches!(
        y.kind(),
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        return value_err(format!(
            "{what}: likelihood 'categorical' expects integer class labels, got dtype {:?}",
            y.kind()
        ));
    }
    Ok(())
}

/// Every label in `[0, c)`, or a `ValueError` naming `what` and the range found; `also` completes
/// the message (e.g. the values that are allowed besides).
fn check_range(labels: &Tensor, c: i64, what: &str, also: &str) -> Result<()> {
    if labels.numel() == 0 {
        return Ok(());
    }
    // One device-to-host copy for both ends (each read of a GPU value waits for the GPU).
    let ends = Tensor::stack(&[labels.min(), labels.max()], 0).to_device(tch::Device::Cpu);
    let (lo, hi) = (ends.int64_value(&[0]), ends.int64_value(&[1]));
    if lo < 0 || hi >= c {
        return value_err(format!(
            "{what}: labels must lie in [0, {c}) for {c} output classes{also}, found range [{lo}, {hi}]"
        ));
    }
    Ok(())
}

fn gaussian(inp: &RootSpec, out: &Tensor) -> Result<Vec<Tensor>> {
    let f = match out.dim() {
        1 => out.to_kind(Kind::Float).unsqueeze(1),
        2 => out.to_kind(Kind::Float),
        _ => {
            return value_err(format!(
                "model outputs: likelihood 'gaussian' expects shape [N, D], got {:?}",
                out.size()
            ))
        }
    };
    let (n, d) = (f.size()[0], f.size()[1]);
    let targets = || -> Result<Tensor> {
        let y = need(inp.targets.as_ref(), "targets")?;
        if y.numel() as i64 != n * d {
            return value_err(format!(
                "targets: likelihood 'gaussian' expects targets shaped like the outputs [{n}, {d}], got {:?}",
                y.size()
            ));
        }
        Ok(y.to_kind(Kind::Float).reshape([n, d]))
    };
    Ok(match inp.kind {
        FisherKind::Empirical => {
            vec![((targets()? - &f).square() * -0.5).sum(Kind::Float)]
        }
        FisherKind::Batched => {
            let per = (targets()? - &f)
                .square()
                .sum_dim_intlist(1, false, Kind::Float)
                * 0.5;
            vec![per.mean(Kind::Float)]
        }
        // E_y[(Jᵀ(y−f))²] = Σ_d (∇f_d)² for y ~ N(f, I).
        FisherKind::Exact => (0..d).map(|k| f.select(1, k).sum(Kind::Float)).collect(),
        FisherKind::Mc => {
            let eps = need(inp.mc_draws.as_ref(), "mc_draws")?;
            if eps.dim() != 3 || eps.size()[0] != n || eps.size()[2] != d {
                return value_err(format!(
                    "mc noise: expected shape [{n}, S, {d}], got {:?}",
                    eps.size()
                ));
            }
            let s = eps.size()[1];
            let scale = 1.0 / (s as f64).sqrt();
            let eps = eps.to_kind(Kind::Float);
            (0..s)
                .map(|k| (eps.select(1, k) * &f).sum(Kind::Float) * scale)
                .collect()
        }
    })
}

fn custom(inp: &RootSpec, outputs: &Tensor) -> Result<Vec<Tensor>> {
    let ll = need(inp.loglik.as_ref(), "loglik")?;
    let n = outputs.size().first().copied().unwrap_or(0);
    if ll.dim() != 1 || ll.size()[0] != n {
        return value_err(format!(
            "likelihood: a callable likelihood must return the per-sample log-likelihood of \
             shape [{n}], got {:?}",
            ll.size()
        ));
    }
    let ll = ll.to_kind(Kind::Float);
    match inp.kind {
        FisherKind::Empirical => Ok(vec![ll.sum(Kind::Float)]),
        FisherKind::Batched => Ok(vec![-ll.mean(Kind::Float)]),
        k => value_err(format!(
            "kind: {k:?} needs to sample from the model's predictive distribution, which a \
             callable likelihood does not define; use kind='empirical' or 'batched'"
        )),
    }
}
