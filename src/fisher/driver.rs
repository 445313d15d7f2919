//! Runs one backward pass per root w.r.t. the recorded layer outputs (never touching `.grad`),
//! applies each layer's rule and adds Σ_n (per-sample gradient)² into the float32 sums of one
//! estimation.
//!
//! A parameter recorded by several layer calls in one forward pass (a module called twice, a
//! table tied between layers) has its per-sample gradients summed over the calls before they
//! are squared: that is what makes shared parameters exact.

use super::chunks::{add_to, chunks, SlotTotals, Workspace};
use super::rules::{Rule, Want};
use crate::error::{value_err, Context, Result};
use crate::kfac::factors::KfacSums;
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// One call of a layer with a rule, recorded by a forward hook.
#[derive(Debug)]
pub struct LayerCall {
    pub rule: Arc<dyn Rule>,
    pub input: Tensor,
    pub output: Tensor,
    /// Index of the weight and of the bias in the estimation's parameters (None: absent, or
    /// handled elsewhere).
    pub slots: [Option<usize>; 2],
    /// The KFAC site this call feeds (`Batch::kfac`): its parameters then get Kronecker factors
    /// instead of squared gradients.
    pub kfac: Option<usize>,
}

impl LayerCall {
    fn want(&self) -> Want {
        Want {
            weight: self.slots[0].is_some(),
            bias: self.slots[1].is_some(),
        }
    }

    fn samples(&self) -> i64 {
        self.input.size().first().copied().unwrap_or(0)
    }
}

/// How many recorded calls use each slot in this forward pass.
struct Uses(BTreeMap<usize, usize>);

impl Uses {
    fn of(calls: &[LayerCall]) -> Self {
        let mut uses = BTreeMap::new();
        for c in calls {
            for s in c.slots.iter().flatten() {
                *uses.entry(*s).or_insert(0) += 1;
            }
        }
        Uses(uses)
    }

    fn shared(&self, c: &LayerCall) -> bool {
        c.slots.iter().flatten().any(|s| self.0[s] > 1)
    }
}

/// What `FisherSums::rule_mismatch` found: `(slot, relative difference)` per slot checked, and
/// the indices of the calls whose output rows are not the samples (with a probe row).
pub type RuleCheck = (Vec<(usize, f64)>, Vec<usize>);

/// Σ_n (per-sample gradient)² per parameter, in float32, over the batches seen so far.
pub struct FisherSums {
    /// The parameters, by slot (read for their shapes, and by the `whole` and check paths).
    pub params: Vec<Tensor>,
    /// The sums, by slot, each shaped like its parameter, on its device.
    pub totals: Vec<Tensor>,
    /// Parameter names, by slot, for error messages.
    pub names: Vec<String>,
    /// The bound on per-sample intermediates and the buffers that hold them.
    pub work: Workspace,
}

/// One batch's contribution: the roots, the layer calls the rules handle, and the slots whose
/// whole gradient is squared as is (parameters without a rule in a pass over one sample, or
/// every parameter for the `batched` kind).
pub struct Batch<'a> {
    pub roots: Vec<Tensor>,
    pub calls: &'a [LayerCall],
    pub whole: &'a [usize],
    /// Where calls with a KFAC site add their factors (needed when any call has one).
    pub kfac: Option<&'a KfacSums>,
}

impl FisherSums {
    pub fn new(params: Vec<Tensor>, names: Vec<String>, budget: i64) -> Result<Self> {
        if params.len() != names.len() {
            return value_err(format!(
                "names: expected one name per parameter ({}), got {}",
                params.len(),
                names.len()
            ));
        }
        let totals = params
            .iter()
            .map(|p| Tensor::f_zeros(p.size().as_slice(), (Kind::Float, p.device())))
            .collect::<std::result::Result<_, _>>()
            .ctx("allocate the Fisher sums")?;
        Ok(Self {
            params,
            totals,
            names,
            work: Workspace::new(budget),
        })
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.totals.len() {
            return value_err(format!(
                "slot {slot}: expected an index below {} (the number of parameters)",
                self.totals.len()
            ));
        }
        Ok(())
    }

    /// Adds `t` (Σ over samples of squared gradients of parameter `slot`) into its sum.
    pub fn add(&self, slot: usize, t: &Tensor) -> Result<()> {
        self.check_slot(slot)?;
        let mut total = self.totals[slot].shallow_clone();
        if total.size() != t.size() {
            return value_err(format!(
                "parameter '{}': the rule produced shape {:?}, expected {:?}",
                self.names[slot],
                t.size(),
                total.size()
            ));
        }
        // Per-sample results come from the parameter's own device; a move is needed only for
        // sums computed elsewhere, and is not paid on every add of the hot path.
        let _ = if t.device() == total.device() {
            total.f_add_(t)
        } else {
            total.f_add_(&t.to_device(total.device()))
        }
        .ctx("add into the Fisher sums")?;
        Ok(())
    }

    /// Adds one batch's Σ_n (per-sample gradient)².
    pub fn add_batch(&self, batch: &Batch) -> Result<()> {
        for s in batch.calls.iter().flat_map(|c| c.slots.iter().flatten()) {
            self.check_slot(*s)?;
        }
        for s in batch.whole {
            self.check_slot(*s)?;
        }
        for c in batch.calls {
            if let Some(site) = c.kfac {
                let Some(kfac) = batch.kfac else {
                    return value_err(
                        "calls: a layer call has a kfac_site but no kfac sums were given",
                    );
                };
                kfac.add_input(site, c.rule.as_ref(), &c.input)?;
            }
        }
        let uses = Uses::of(batch.calls);
        let mut inputs: Vec<&Tensor> = batch.calls.iter().map(|c| &c.output).collect();
        inputs.extend(batch.whole.iter().map(|s| &self.params[*s]));
        if inputs.is_empty() {
            return Ok(()); // every parameter of this batch goes through another path
        }
        // Outer-product calls: the squared output gradients of every root, summed, then the
        // rule's one GEMM (in its own weight layout).
        let mut g2_sums: Vec<Option<Tensor>> = batch.calls.iter().map(|_| None).collect();
        for (r, root) in batch.roots.iter().enumerate() {
            let keep_graph = r + 1 < batch.roots.len();
            let grads = Tensor::f_run_backward(&[root], &inputs, keep_graph, false)
                .ctx("backward pass of the log-likelihood")?;
            let (layer_grads, whole_grads) = grads.split_at(batch.calls.len());
            for (slot, g) in batch.whole.iter().zip(whole_grads) {
                if g.defined() {
                    self.add(*slot, &g.to_kind(Kind::Float).square())?;
                }
            }
            let mut shared: Vec<(&LayerCall, &Tensor)> = Vec::new();
            for ((c, g), g2) in batch.calls.iter().zip(layer_grads).zip(&mut g2_sums) {
                if !g.defined() {
                    continue;
                }
                if let (Some(site), Some(kfac)) = (c.kfac, batch.kfac) {
                    kfac.add_grad(site, c.rule.as_ref(), g)?;
                } else if uses.shared(c) {
                    shared.push((c, g));
                } else if c.rule.is_outer_product(&c.input) {
                    add_to(g2, g.to_kind(Kind::Float).square());
                } else {
                    let sq = c.rule.sum_sq(&c.input, g, c.want(), &self.work)?;
                    self.add_slots(c, sq)?;
                }
            }
            self.add_shared(&shared)?;
        }
        for (c, g2) in batch.calls.iter().zip(g2_sums) {
            if let Some(g2) = g2 {
                let sq = c.rule.outer_product_sum_sq(&c.input, &g2, c.want())?;
                self.add_slots(c, sq)?;
            }
        }
        Ok(())
    }

    fn add_slots(&self, c: &LayerCall, results: [Option<Tensor>; 2]) -> Result<()> {
        for (slot, t) in c.slots.iter().zip(results) {
            if let (Some(slot), Some(t)) = (slot, t) {
                self.add(*slot, &t)?;
            }
        }
        Ok(())
    }

    /// Calls whose parameters are shared: per-sample gradients summed per parameter over the
    /// calls, then squared (a single sample's straight into the running sum).
    fn add_shared(&self, shared: &[(&LayerCall, &Tensor)]) -> Result<()> {
        for_each_chunk(shared, &self.work, |by_slot| {
            for (slot, t) in by_slot {
                if t.size().first() == Some(&1) {
                    self.check_slot(slot)?;
                    let one = t.get(0);
                    let _ = self.totals[slot]
                        .shallow_clone()
                        .f_addcmul_(&one, &one)
                        .ctx("add into the Fisher sums")?;
                } else {
                    self.add(slot, &t.square().sum_dim_intlist(0, false, Kind::Float))?;
                }
            }
            Ok(())
        })
    }

    /// Checks that the rules see every use of their parameters: for each slot in `slots`, the
    /// sum over samples of the rules' per-sample gradients must equal autograd's gradient of
    /// `root`. Returns the relative difference per slot; a large one means the parameter is also
    /// used outside the layer that owns it (e.g. `F.linear(h, emb.weight)`), so it needs the
    /// fallback.
    ///
    /// With `row` (the root then depends on that sample alone), the same backward pass also
    /// tests per-sample separability: the second list holds the indices of the calls whose output
    /// gradient is non-zero in another row, i.e. whose rows are not the batch's samples.
    pub fn rule_mismatch(
        &self,
        root: &Tensor,
        calls: &[LayerCall],
        slots: &[usize],
        row: Option<i64>,
    ) -> Result<RuleCheck> {
        for s in slots {
            self.check_slot(*s)?;
        }
        let mut inputs: Vec<&Tensor> = calls.iter().map(|c| &c.output).collect();
        inputs.extend(slots.iter().map(|s| &self.params[*s]));
        if inputs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let grads = Tensor::f_run_backward(&[root], &inputs, true, false)
            .ctx("backward pass of the consistency check")?;
        let (layer_grads, param_grads) = grads.split_at(calls.len());
        let mut crossing = Vec::new();
        if let Some(row) = row {
            for (i, g) in layer_grads.iter().enumerate() {
                let n = g.size().first().copied().unwrap_or(0);
                if !g.defined() || row >= n {
                    continue;
                }
                let others = [(0, row), (row + 1, n - row - 1)];
                if others.iter().any(|&(start, len)| {
                    len > 0
                        && g.narrow(0, start, len)
                            .count_nonzero(None::<i64>)
                            .int64_value(&[])
                            > 0
                }) {
                    crossing.push(i);
                }
            }
        }
        let recorded: Vec<(&LayerCall, &Tensor)> = calls
            .iter()
            .zip(layer_grads)
            .filter(|(_, g)| g.defined())
            .collect();
        let mut ours = SlotTotals::default();
        for (c, g) in &recorded {
            let sums = c.rule.summed(&c.input, g, c.want(), &self.work)?;
            for (slot, t) in c.slots.iter().zip(sums) {
                if let (Some(slot), Some(t)) = (slot, t) {
                    ours.add(*slot, t);
                }
            }
        }
        let mut out = Vec::with_capacity(slots.len());
        for (slot, g) in slots.iter().zip(param_grads) {
            let p = &self.params[*slot];
            let zeros = || Tensor::zeros(p.size().as_slice(), (Kind::Float, p.device()));
            let truth = if g.defined() {
                g.to_kind(Kind::Float)
            } else {
                zeros()
            };
            let ours = ours
                .get(*slot)
                .map_or_else(zeros, |s| s.reshape(p.size().as_slice()));
            let scale = truth
                .norm()
                .double_value(&[])
                .max(ours.norm().double_value(&[]));
            // In place: `ours` is this check's own sum (a fresh tensor per slot), and a fresh
            // difference of an LM head's size costs more in page faults than the subtraction.
            let mut ours = ours;
            let _ = ours.f_sub_(&truth).ctx("rule check")?;
            let diff = ours.norm().double_value(&[]);
            out.push((*slot, if scale > 0.0 { diff / scale } else { 0.0 }));
        }
        Ok((out, crossing))
    }
}

/// Walks the samples of `calls` (all of one batch size) in chunks that fit the workspace's
/// budget, and hands `f` each chunk's per-sample gradients `[len, *param]`, summed per slot over
/// the calls (dense rules first, so that an embedding's lookups are added into a tied head's
/// buffer). The tensors handed to `f` may be workspace buffers: valid until `f` returns.
fn for_each_chunk(
    calls: &[(&LayerCall, &Tensor)],
    ws: &Workspace,
    mut f: impl FnMut(BTreeMap<usize, Tensor>) -> Result<()>,
) -> Result<()> {
    let Some((first, _)) = calls.first() else {
        return Ok(());
    };
    let n = first.samples();
    if let Some((c, _)) = calls.iter().find(|(c, _)| c.samples() != n) {
        return value_err(format!(
            "a shared parameter is used by layer calls with different batch sizes ({} and {n}); \
             its per-sample gradients cannot be matched",
            c.samples()
        ));
    }
    let chunk = calls
        .iter()
        .map(|(c, g)| c.rule.chunk_size(&c.input, g, ws.budget))
        .min()
        .unwrap_or(n);
    let mut ordered: Vec<&(&LayerCall, &Tensor)> = calls.iter().collect();
    ordered.sort_by_key(|(c, _)| c.rule.sparse_per_sample());
    for (start, len) in chunks(n, chunk) {
        let mut by_slot: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (c, g) in &ordered {
            let mut acc = c.slots.map(|s| s.and_then(|s| by_slot.remove(&s)));
            // A new weight entry lives in its slot's own buffer (keys above 0, which `sum_sq` uses).
            let key = c.slots[0].map_or(0, |s| s + 1);
            let device = c.input.device();
            let fresh = |shape: &[i64]| ws.buffer(key, shape, device);
            c.rule.accumulate_per_sample(
                &mut acc,
                &c.input.narrow(0, start, len),
                &g.narrow(0, start, len),
                c.want(),
                &fresh,
            )?;
            for (slot, t) in c.slots.iter().zip(acc) {
                if let (Some(slot), Some(t)) = (slot, t) {
                    by_slot.insert(*slot, t);
                }
            }
        }
        f(by_slot)?;
    }
    Ok(())
}
