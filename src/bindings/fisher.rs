//! The Fisher engine's boundary types. Python builds them by keyword, each checked when built;
//! the heavy work then runs with the GIL released.
//!
//! - `layer_rule(module)`: the rule of a module's exact type (`rules::REGISTRY`), or None;
//!   `registered_layers()`: the registry's module types.
//! - `LayerCall`: one recorded call of such a module (input, output, parameter slots).
//! - `RootSpec`: the Fisher kind, the likelihood and the tensors they need.
//! - `FisherSums`: the per-parameter sums of one estimation, fed batch by batch.

use crate::bindings::kfac::KfacSums;
use crate::error;
use crate::fisher::driver::{self, Batch};
use crate::fisher::roots::{self, FisherKind, Likelihood};
use crate::fisher::rules::{self, Rule};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tch::Tensor;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The per-sample rule of one module, read from its settings (see `layer_rule`).
#[pyclass(module = "ewc_rs._core", frozen)]
pub struct LayerRule {
    type_name: String,
    rule: Arc<dyn Rule>,
}

#[pymethods]
impl LayerRule {
    /// The module type the rule was made for (`__module__.__qualname__`).
    #[getter]
    fn module_type(&self) -> &str {
        &self.type_name
    }

    /// The weight as a KFAC matrix: `(inputs, outputs, transposed)` for a weight of this
    /// shape (bias column not counted; `transposed`: stored [in, out]), or None when the rule
    /// has no Kronecker-factored form (e.g. a grouped convolution, a normalisation layer).
    fn kfac_form(&self, weight_shape: Vec<i64>) -> Option<(i64, i64, bool)> {
        self.rule
            .kfac_form(&weight_shape)
            .map(|f| (f.inputs, f.outputs, f.transposed))
    }

    fn __repr__(&self) -> String {
        format!("LayerRule({:?})", self.rule)
    }
}

/// The per-sample rule for `module`'s exact type with its current settings.
///
/// Args:
///     module: a `torch.nn.Module`.
/// Returns:
///     A `LayerRule`, or None when no rule covers this module (another type, a subclass, or
///     settings the rule does not handle); its parameters then need the exact fallback.
#[pyfunction]
pub fn layer_rule(module: &Bound<'_, PyAny>) -> PyResult<Option<LayerRule>> {
    let ty = module.get_type();
    let type_name = format!("{}.{}", ty.module()?, ty.qualname()?);
    let Some(read) = rules::lookup(&type_name) else {
        return Ok(None);
    };
    Ok(read(module)?.map(|rule| LayerRule { type_name, rule }))
}

/// The module types the rule registry covers (`__module__.__qualname__`, exact types), in the
/// registry's order: what the documentation's "Supported layers" page is generated from.
#[pyfunction]
pub fn registered_layers() -> Vec<&'static str> {
    rules::REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// One recorded call of a layer with a rule.
///
/// Args (keyword-only):
///     rule: the layer's `LayerRule`.
///     input: the layer's input (sample index in dim 0), detached.
///     output: the layer's output, connected to the autograd graph.
///     weight_slot, bias_slot: where the weight and the bias sit in the estimation's parameter
///         list (`FisherSums`), or None when absent or handled elsewhere; at least one is given.
///     kfac_site: the KFAC site (index in `KfacSums`) this call adds its factors to instead of
///         squared gradients, or None.
#[pyclass(module = "ewc_rs._core", frozen)]
pub struct LayerCall {
    call: Mutex<driver::LayerCall>,
}

#[pymethods]
impl LayerCall {
    #[new]
    #[pyo3(signature = (*, rule, input, output, weight_slot=None, bias_slot=None, kfac_site=None))]
    fn new(
        rule: &LayerRule,
        input: PyTensor,
        output: PyTensor,
        weight_slot: Option<usize>,
        bias_slot: Option<usize>,
        kfac_site: Option<usize>,
    ) -> PyResult<Self> {
        let (input, output) = (input.0, output.0);
        if weight_slot.is_none() && bias_slot.is_none() {
            return Err(PyValueError::new_err(
                "weight_slot, bias_slot: expected at least one parameter slot, got none",
            ));
        }
        if weight_slot.is_some() && weight_slot == bias_slot {
            return Err(PyValueError::new_err(format!(
                "weight_slot, bias_slot: expected two different slots, got {weight_slot:?} twice"
            )));
        }
        let rows = |t: &Tensor| t.size().first().copied();
        if input.dim() == 0 || rows(&input) != rows(&output) {
            return Err(PyValueError::new_err(format!(
                "input, output: expected the same number of samples in dim 0, got shapes {:?} \
                 and {:?}",
                input.size(),
                output.size()
            )));
        }
        Ok(Self {
            call: Mutex::new(driver::LayerCall {
                rule: rule.rule.clone(),
                input,
                output,
                slots: [weight_slot, bias_slot],
                kfac: kfac_site,
            }),
        })
    }

    fn __repr__(&self) -> String {
        let c = lock(&self.call);
        format!(
            "LayerCall({:?}, input={:?}, output={:?}, slots={:?}, kfac_site={:?})",
            c.rule,
            c.input.size(),
            c.output.size(),
            c.slots,
            c.kfac
        )
    }
}

impl LayerCall {
    /// A copy sharing the tensors (to hand to a thread without the GIL).
    fn share(&self) -> driver::LayerCall {
        let c = lock(&self.call);
        driver::LayerCall {
            rule: c.rule.clone(),
            input: c.input.shallow_clone(),
            output: c.output.shallow_clone(),
            slots: c.slots,
            kfac: c.kfac,
        }
    }
}

/// What the Fisher's "roots" (the scalars whose gradients give it) are built from, besides the
/// model's outputs.
///
/// Args (keyword-only):
///     kind: 'exact', 'mc', 'empirical' or 'batched'.
///     likelihood: 'categorical', 'gaussian' or 'custom'.
///     targets: labels [N] (categorical) or targets [N, D] (gaussian); needed by 'empirical'
///         and 'batched' with a built-in likelihood.
///     mc_draws: for 'mc', labels [N, S] drawn from p(·|x) (categorical) or noise [N, S, D]
///         (gaussian).
///     loglik: for 'custom', the per-sample log-likelihood [N], connected to the graph
///         ('empirical' and 'batched' only).
///     ignore_index: with per-position logits [N, P, C], the target value of positions that do
///         not count (default -100).
#[pyclass(module = "ewc_rs._core", frozen)]
pub struct RootSpec {
    spec: Mutex<roots::RootSpec>,
}

#[pymethods]
impl RootSpec {
    #[new]
    #[pyo3(
        signature = (*, kind, likelihood, targets=None, mc_draws=None, loglik=None, ignore_index=-100),
        text_signature = "(*, kind, likelihood, targets=None, mc_draws=None, loglik=None, ignore_index=-100)"
    )]
    fn new(
        kind: &str,
        likelihood: &str,
        targets: Option<PyTensor>,
        mc_draws: Option<PyTensor>,
        loglik: Option<PyTensor>,
        ignore_index: i64,
    ) -> PyResult<Self> {
        let mut spec = roots::RootSpec::new(
            FisherKind::parse(kind)?,
            Likelihood::parse(likelihood)?,
            targets.map(|t| t.0),
            mc_draws.map(|t| t.0),
            loglik.map(|t| t.0),
        )?;
        spec.ignore_index = ignore_index;
        Ok(Self {
            spec: Mutex::new(spec),
        })
    }

    fn __repr__(&self) -> String {
        let s = lock(&self.spec);
        format!("RootSpec(kind={:?}, likelihood={:?})", s.kind, s.likelihood)
    }
}

impl RootSpec {
    fn share(&self) -> roots::RootSpec {
        lock(&self.spec).shallow_clone()
    }
}

/// Σ_n (per-sample gradient)² per parameter, in float32, over the batches of one estimation.
///
/// Args (keyword-only):
///     params: the parameters to estimate, in slot order (read, never written).
///     names: their names (for error messages).
///     budget_bytes: bound on per-sample intermediates.
#[pyclass(module = "ewc_rs._core", frozen)]
pub struct FisherSums {
    sums: Mutex<driver::FisherSums>,
}

#[pymethods]
impl FisherSums {
    #[new]
    #[pyo3(signature = (*, params, names, budget_bytes))]
    fn new(params: Vec<PyTensor>, names: Vec<String>, budget_bytes: i64) -> PyResult<Self> {
        let params = params.into_iter().map(|t| t.0).collect();
        let sums = driver::FisherSums::new(params, names, budget_bytes)?;
        Ok(Self {
            sums: Mutex::new(sums),
        })
    }

    /// The sums by slot (float32, each shaped like its parameter; shared, not copied).
    #[getter]
    fn totals(&self) -> Vec<PyTensor> {
        lock(&self.sums)
            .totals
            .iter()
            .map(|t| PyTensor(t.shallow_clone()))
            .collect()
    }

    /// Adds one batch: a backward pass per root, then each layer call's rule.
    ///
    /// Args:
    ///     outputs: the model's outputs for the batch (connected to the autograd graph).
    ///     roots: what the roots are built from.
    ///     calls: the recorded layer calls whose parameters the rules handle.
    ///     whole_slots: parameters whose whole gradient is squared as is (a pass over one
    ///         sample, or every parameter for the 'batched' kind).
    ///     kfac: where calls with a `kfac_site` add their Kronecker factors.
    #[pyo3(signature = (outputs, roots, *, calls=Vec::new(), whole_slots=Vec::new(), kfac=None))]
    fn add_batch(
        &self,
        py: Python<'_>,
        outputs: PyTensor,
        roots: &RootSpec,
        calls: Vec<PyRef<'_, LayerCall>>,
        whole_slots: Vec<usize>,
        kfac: Option<PyRef<'_, KfacSums>>,
    ) -> PyResult<()> {
        let (outputs, spec, calls) = shared_batch(outputs, roots, &calls);
        let kfac = kfac.as_ref().map(|k| &k.sums);
        let sums = &self.sums;
        py.allow_threads(move || {
            let roots = spec.build(&outputs)?;
            let factors = kfac.map(lock);
            lock(sums).add_batch(&Batch {
                roots,
                calls: &calls,
                whole: &whole_slots,
                kfac: factors.as_deref(),
            })
        })?;
        Ok(())
    }

    /// Adds `sum_sq` (Σ over samples of squared gradients, shaped like the parameter) into the
    /// sum of parameter `slot` (for per-sample gradients computed elsewhere).
    fn add(&self, py: Python<'_>, slot: usize, sum_sq: PyTensor) -> PyResult<()> {
        let (t, sums) = (sum_sq.0, &self.sums);
        py.allow_threads(move || lock(sums).add(slot, &t))?;
        Ok(())
    }

    /// Relative difference, per slot, between the rules' summed per-sample gradients and
    /// autograd's gradient of the first root; large values flag parameters used outside their
    /// layer.
    ///
    /// Args:
    ///     outputs, roots, calls: as for `add_batch`.
    ///     slots: the parameters to check.
    ///     row: when the root depends on this sample alone: also report the calls whose output
    ///         gradient is non-zero in another row (from the same backward pass).
    /// Returns:
    ///     `(slot, relative_difference)` for each slot, and the indices (into `calls`) of the
    ///     calls whose rows are not samples (empty without `row`).
    #[pyo3(signature = (outputs, roots, calls, slots, row=None))]
    fn rule_mismatch(
        &self,
        py: Python<'_>,
        outputs: PyTensor,
        roots: &RootSpec,
        calls: Vec<PyRef<'_, LayerCall>>,
        slots: Vec<usize>,
        row: Option<i64>,
    ) -> PyResult<driver::RuleCheck> {
        let (outputs, spec, calls) = shared_batch(outputs, roots, &calls);
        let sums = &self.sums;
        let out = py.allow_threads(move || {
            let roots = spec.build(&outputs)?;
            let Some(root) = roots.first() else {
                return error::value_err("roots: this batch has no root to check the rules with");
            };
            lock(sums).rule_mismatch(root, &calls, &slots, row)
        })?;
        Ok(out)
    }
}

/// A batch's outputs, root specification and layer calls as values that share the tensors and
/// can leave the GIL.
fn shared_batch(
    outputs: PyTensor,
    roots: &RootSpec,
    calls: &[PyRef<'_, LayerCall>],
) -> (Tensor, roots::RootSpec, Vec<driver::LayerCall>) {
    (
        outputs.0,
        roots.share(),
        calls.iter().map(|c| c.share()).collect(),
    )
}
