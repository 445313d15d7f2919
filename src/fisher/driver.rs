//! Runs one backward pass per root w.r.t. the recorded layer outputs (never touching `.grad`),
//! applies each layer's rule and adds Σ_n (per-sample gradient)² into float32 accumulators.
//!
//! A parameter recorded by several layer calls in one forward pass (a module called twice, a
//! table tied between layers) has its per-sample gradients summed over the calls before they
//! are squared: that is what makes shared parameters exact.

use super::rules::Rule;
use crate::error::{value_err, Context, Result};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// One call of a layer with a rule, recorded by a forward hook.
pub struct Capture {
    pub rule: Rule,
    pub input: Tensor,
    pub output: Tensor,
    /// Accumulator index for the weight and for the bias (None: absent or frozen).
    pub slots: [Option<usize>; 2],
}

impl Capture {
    fn want(&self) -> [bool; 2] {
        [self.slots[0].is_some(), self.slots[1].is_some()]
    }
}

/// Accumulators (float32, one per parameter, shared with Python) and their names for errors.
pub struct Accumulators {
    pub tensors: Vec<Tensor>,
    pub names: Vec<String>,
}

impl Accumulators {
    fn add(&self, slot: usize, t: &Tensor) -> Result<()> {
        let mut acc = self.tensors[slot].shallow_clone();
        if acc.size() != t.size() {
            return value_err(format!(
                "parameter '{}': the rule produced shape {:?}, expected {:?}",
                self.names[slot],
                t.size(),
                acc.size()
            ));
        }
        let _ = acc.f_add_(t).ctx("accumulate")?;
        Ok(())
    }
}

/// Everything one batch contributes.
pub struct BatchJob {
    pub roots: Vec<Tensor>,
    pub captures: Vec<Capture>,
    /// Tensors whose full gradient is squared as is: parameters of modules without a rule, in a
    /// pass over one sample, or every parameter for the `batched` kind.
    pub direct: Vec<(Tensor, usize)>,
    /// Upper bound for per-sample intermediates, in bytes.
    pub budget: i64,
}

fn slot_uses(captures: &[Capture]) -> BTreeMap<usize, usize> {
    let mut uses = BTreeMap::new();
    for c in captures {
        for s in c.slots.iter().flatten() {
            *uses.entry(*s).or_insert(0) += 1;
        }
    }
    uses
}

/// Is this capture the one-GEMM case (2-d Linear, parameters used by it alone)?
fn is_fast_linear(c: &Capture, uses: &BTreeMap<usize, usize>) -> bool {
    matches!(c.rule, Rule::Linear)
        && c.input.dim() == 2
        && c.slots.iter().flatten().all(|s| uses[s] == 1)
}

pub fn accumulate(job: &BatchJob, accs: &Accumulators) -> Result<()> {
    let uses = slot_uses(&job.captures);
    let mut inputs: Vec<&Tensor> = job.captures.iter().map(|c| &c.output).collect();
    inputs.extend(job.direct.iter().map(|(t, _)| t));
    if inputs.is_empty() {
        return Ok(()); // every parameter of this batch goes through another path
    }
    // For 2-d Linear layers, Σ_roots (g_r²)ᵀ a² = (Σ_roots g_r²)ᵀ a²: sum g² first, one GEMM.
    let mut g2_sums: Vec<Option<Tensor>> = job.captures.iter().map(|_| None).collect();

    for (r, root) in job.roots.iter().enumerate() {
        let keep_graph = r + 1 < job.roots.len();
        let grads = Tensor::f_run_backward(&[root], &inputs, keep_graph, false)
            .ctx("backward pass of the log-likelihood")?;
        let (layer_grads, direct_grads) = grads.split_at(job.captures.len());

        for ((_, slot), g) in job.direct.iter().zip(direct_grads) {
            if g.defined() {
                accs.add(*slot, &g.to_kind(Kind::Float).square())?;
            }
        }
        let mut shared: Vec<(usize, &Tensor)> = Vec::new();
        for (i, (c, g)) in job.captures.iter().zip(layer_grads).enumerate() {
            if !g.defined() {
                continue;
            }
            if is_fast_linear(c, &uses) {
                let g2 = g.to_kind(Kind::Float).square();
                g2_sums[i] = Some(match g2_sums[i].take() {
                    Some(s) => s + g2,
                    None => g2,
                });
            } else if c.slots.iter().flatten().any(|s| uses[s] > 1) {
                shared.push((i, g));
            } else {
                let sq = c.rule.sum_sq(&c.input, g, c.want(), job.budget)?;
                for (slot, t) in c.slots.iter().zip(sq) {
                    if let (Some(slot), Some(t)) = (slot, t) {
                        accs.add(*slot, &t)?;
                    }
                }
            }
        }
        accumulate_shared(&job.captures, &shared, &uses, accs, job.budget)?;
    }

    for (c, g2) in job.captures.iter().zip(g2_sums) {
        let Some(g2) = g2 else { continue };
        if let Some(w) = c.slots[0] {
            let a2 = c.input.to_kind(Kind::Float).square();
            let t = g2.f_tr().and_then(|t| t.f_matmul(&a2)).ctx("linear rule")?;
            accs.add(w, &t)?;
        }
        if let Some(b) = c.slots[1] {
            accs.add(b, &g2.sum_dim_intlist(0, false, Kind::Float))?;
        }
    }
    Ok(())
}

/// Captures whose parameters are shared: per-sample gradients are summed per parameter over the
/// captures, then squared. Chunked over samples to bound memory.
fn accumulate_shared(
    captures: &[Capture],
    shared: &[(usize, &Tensor)],
    uses: &BTreeMap<usize, usize>,
    accs: &Accumulators,
    budget: i64,
) -> Result<()> {
    if shared.is_empty() {
        return Ok(());
    }
    let n = captures[shared[0].0].input.size()[0];
    for (i, _) in shared {
        if captures[*i].input.size()[0] != n {
            return value_err(format!(
                "a shared parameter is used by layer calls with different batch sizes ({} and {n}); \
                 its per-sample gradients cannot be matched",
                captures[*i].input.size()[0]
            ));
        }
    }
    let chunk = shared
        .iter()
        .map(|(i, g)| captures[*i].rule.chunk_size(&captures[*i].input, g, budget))
        .min()
        .unwrap_or(n);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let mut sums: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (i, g) in shared {
            let c = &captures[*i];
            let a = c.input.narrow(0, start, len);
            let ps = c.rule.per_sample(&a, &g.narrow(0, start, len), c.want())?;
            for (slot, t) in c.slots.iter().zip(ps) {
                let (Some(slot), Some(t)) = (slot, t) else {
                    continue;
                };
                if uses[slot] == 1 {
                    accs.add(*slot, &t.square().sum_dim_intlist(0, false, Kind::Float))?;
                    continue;
                }
                let t = match sums.remove(slot) {
                    Some(s) => s + t,
                    None => t,
                };
                sums.insert(*slot, t);
            }
        }
        for (slot, t) in sums {
            accs.add(slot, &t.square().sum_dim_intlist(0, false, Kind::Float))?;
        }
        start += len;
    }
    Ok(())
}

/// Checks that the rules see every use of their parameters: for each `(slot, parameter)`, the
/// sum over samples of the rules' per-sample gradients must equal autograd's gradient of `root`.
/// Returns the relative difference per slot; a large one means the parameter is also used
/// outside the layer that owns it (e.g. `F.linear(h, emb.weight)`), so it needs the fallback.
pub fn rule_mismatch(
    root: &Tensor,
    captures: &[Capture],
    params: &[(usize, Tensor)],
    budget: i64,
) -> Result<Vec<(usize, f64)>> {
    let mut inputs: Vec<&Tensor> = captures.iter().map(|c| &c.output).collect();
    inputs.extend(params.iter().map(|(_, p)| p));
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    let grads = Tensor::f_run_backward(&[root], &inputs, true, false)
        .ctx("backward pass of the consistency check")?;
    let (layer_grads, param_grads) = grads.split_at(captures.len());
    let mut sums: BTreeMap<usize, Tensor> = BTreeMap::new();
    for (c, g) in captures.iter().zip(layer_grads) {
        if !g.defined() {
            continue;
        }
        let n = c.input.size()[0];
        let chunk = c.rule.chunk_size(&c.input, g, budget);
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let ps = c.rule.per_sample(
                &c.input.narrow(0, start, len),
                &g.narrow(0, start, len),
                c.want(),
            )?;
            for (slot, t) in c.slots.iter().zip(ps) {
                let (Some(slot), Some(t)) = (slot, t) else {
                    continue;
                };
                let t = t.sum_dim_intlist(0, false, Kind::Float);
                let t = match sums.remove(slot) {
                    Some(s) => s + t,
                    None => t,
                };
                sums.insert(*slot, t);
            }
            start += len;
        }
    }
    let mut out = Vec::with_capacity(params.len());
    for ((slot, p), g) in params.iter().zip(param_grads) {
        let truth = if g.defined() {
            g.to_kind(Kind::Float)
        } else {
            Tensor::zeros(p.size().as_slice(), (Kind::Float, p.device()))
        };
        let ours = match sums.get(slot) {
            Some(s) => s.reshape(p.size().as_slice()),
            None => Tensor::zeros(p.size().as_slice(), (Kind::Float, p.device())),
        };
        let scale = truth
            .norm()
            .double_value(&[])
            .max(ours.norm().double_value(&[]));
        let diff = (&ours - &truth).norm().double_value(&[]);
        out.push((*slot, if scale > 0.0 { diff / scale } else { 0.0 }));
    }
    Ok(out)
}
