//! The Kronecker-factored penalty: P = ½λ Σ_pairs tr(ΔW̃ᵀ G ΔW̃ A) = ½λ Σ ⟨ΔW̃, G ΔW̃ A⟩_F with
//! ΔW̃ = W̃ − W̃* (weight and bias in matrix form `[out, in(+1)]`), and its gradient λ G ΔW̃ A
//! mapped back to the weight's and the bias's shapes.
//!
//! A pair is one (layer, task). Pairs whose matrices have one shape form a stack, built
//! once when the plan is built (θ*, A and G as `[k, ...]` tensors), so a step is two batched
//! matrix products per stack whatever the number of layers and tasks.

use crate::error::{value_err, Context, Result};
use tch::{Kind, Tensor};

/// How a layer's parameters form W̃.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KronLayout {
    /// The weight is stored `[in, out]` (transformers' `Conv1D`); else W̃ = weight.reshape(out, -1).
    pub transposed: bool,
    /// A bias column is appended (A's last row and column).
    pub bias: bool,
}

/// Pairs of one matrix shape: `layers[j]` is the layer of pair j; `star` `[k, out, in']`,
/// `a` `[k, in', in']`, `g` `[k, out, out]`, float32 on the layers' device.
pub struct KronStack {
    pub layers: Vec<usize>,
    pub star: Tensor,
    pub a: Tensor,
    pub g: Tensor,
}

/// Every (layer, task) pair of the penalty, stacked by shape.
pub struct KronPlan {
    pub layouts: Vec<KronLayout>,
    pub stacks: Vec<KronStack>,
}

/// The penalty's value (0-d float32) and its gradient per layer, in each parameter's shape and
/// dtype.
pub struct KronPenalty {
    pub value: Tensor,
    pub weight_grads: Vec<Tensor>,
    pub bias_grads: Vec<Option<Tensor>>,
}

impl KronStack {
    fn check(&self, i: usize, layers: usize) -> Result<()> {
        let k = self.layers.len() as i64;
        let (s, a, g) = (self.star.size(), self.a.size(), self.g.size());
        let ok = s.len() == 3
            && s[0] == k
            && a == [k, s[2], s[2]]
            && g == [k, s[1], s[1]]
            && [&self.star, &self.a, &self.g]
                .iter()
                .all(|t| t.kind() == Kind::Float);
        if !ok {
            return value_err(format!(
                "stacks[{i}]: expected float32 star [k, out, in], a [k, in, in], g [k, out, out] \
                 with k = {k} layers, got star {s:?}, a {a:?}, g {g:?}"
            ));
        }
        if let Some(l) = self.layers.iter().find(|&&l| l >= layers) {
            return value_err(format!(
                "stacks[{i}]: layer index {l} is out of range ({layers} layers)"
            ));
        }
        Ok(())
    }
}

impl KronPlan {
    pub fn new(layouts: Vec<KronLayout>, stacks: Vec<KronStack>) -> Result<Self> {
        for (i, g) in stacks.iter().enumerate() {
            g.check(i, layouts.len())?;
        }
        Ok(Self { layouts, stacks })
    }

    /// W̃ `[out, in(+1)]` of each layer, float32, detached.
    fn matrices(&self, weights: &[Tensor], biases: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
        if weights.len() != self.layouts.len() || biases.len() != self.layouts.len() {
            return value_err(format!(
                "weights, biases: expected {} of each (the plan's layers), got {} and {}",
                self.layouts.len(),
                weights.len(),
                biases.len()
            ));
        }
        let mut out = Vec::with_capacity(weights.len());
        for (i, ((w, b), layout)) in weights.iter().zip(biases).zip(&self.layouts).enumerate() {
            let w = w.detach().to_kind(Kind::Float);
            let m = if layout.transposed {
                w.tr()
            } else {
                let rows = w.size().first().copied().unwrap_or(0);
                w.reshape([rows, -1])
            };
            let m = match (b, layout.bias) {
                (Some(b), true) => {
                    let col = b.detach().to_kind(Kind::Float).reshape([-1, 1]);
                    Tensor::f_cat(&[m, col], 1).ctx("KFAC penalty (bias column)")?
                }
                (None, false) => m,
                _ => {
                    return value_err(format!(
                        "biases[{i}]: the plan's layer {} a bias",
                        if layout.bias { "has" } else { "has no" }
                    ))
                }
            };
            out.push(m);
        }
        Ok(out)
    }

    /// The penalty and its gradient for the current weights.
    pub fn evaluate(
        &self,
        weights: &[Tensor],
        biases: &[Option<Tensor>],
        lam: f64,
    ) -> Result<KronPenalty> {
        let mats = self.matrices(weights, biases)?;
        let mut grads: Vec<Option<Tensor>> = mats.iter().map(|_| None).collect();
        let mut value: Option<Tensor> = None;
        for (i, stack) in self.stacks.iter().enumerate() {
            let stacked: Vec<&Tensor> = stack.layers.iter().map(|&l| &mats[l]).collect();
            let delta = Tensor::f_stack(&stacked, 0)
                .and_then(|d| d.f_sub(&stack.star))
                .ctx("KFAC penalty (weight change)")?;
            let r = stack
                .g
                .f_bmm(&delta)
                .and_then(|t| t.f_bmm(&stack.a))
                .map_err(|e| {
                    crate::error::EwcError::Torch(format!("KFAC penalty (stack {i}: G ΔW A)"), e)
                })?;
            let part = (&delta * &r).sum(Kind::Float);
            value = Some(match value {
                Some(v) => {
                    let part = part.to_device(v.device());
                    v + part
                }
                None => part,
            });
            for (j, &l) in stack.layers.iter().enumerate() {
                let t = r.get(j as i64) * lam;
                grads[l] = Some(match grads[l].take() {
                    Some(acc) => acc + t,
                    None => t,
                });
            }
        }
        let value = match value {
            Some(v) => v * (0.5 * lam),
            None => Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
        };
        let mut weight_grads = Vec::with_capacity(mats.len());
        let mut bias_grads = Vec::with_capacity(mats.len());
        for (l, ((w, layout), m)) in weights.iter().zip(&self.layouts).zip(&mats).enumerate() {
            let grad = grads[l].take().unwrap_or_else(|| m.zeros_like());
            let inputs = grad.size()[1] - i64::from(layout.bias);
            let gw = grad.narrow(1, 0, inputs);
            let gw = if layout.transposed {
                gw.tr().contiguous()
            } else {
                gw.reshape(w.size().as_slice())
            };
            weight_grads.push(gw.to_kind(w.kind()));
            bias_grads.push(match &biases[l] {
                Some(b) if layout.bias => Some(grad.select(1, inputs).to_kind(b.kind())),
                _ => None,
            });
        }
        Ok(KronPenalty {
            value,
            weight_grads,
            bias_grads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const OPTS: (Kind, Device) = (Kind::Double, Device::Cpu);

    fn spd(n: i64) -> Tensor {
        let x = Tensor::randn([n, n + 2], OPTS);
        x.matmul(&x.tr()) / (n as f64)
    }

    /// ½ vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) with the column-major vec (torch.kron materialised), for
    /// two tasks on one layer with a bias, and the gradient by autograd of that expression.
    #[test]
    fn penalty_equals_the_materialised_kronecker_quadratic() {
        tch::manual_seed(21);
        let (out, inp) = (3, 4);
        let w = Tensor::randn([out, inp], OPTS);
        let b = Tensor::randn([out], OPTS);
        let tasks: Vec<(Tensor, Tensor, Tensor)> = (0..2)
            .map(|_| (Tensor::randn([out, inp + 1], OPTS), spd(inp + 1), spd(out)))
            .collect();
        let f32 = |t: &Tensor| t.to_kind(Kind::Float);
        let stack = KronStack {
            layers: vec![0, 0],
            star: Tensor::stack(&tasks.iter().map(|t| f32(&t.0)).collect::<Vec<_>>(), 0),
            a: Tensor::stack(&tasks.iter().map(|t| f32(&t.1)).collect::<Vec<_>>(), 0),
            g: Tensor::stack(&tasks.iter().map(|t| f32(&t.2)).collect::<Vec<_>>(), 0),
        };
        let layout = KronLayout {
            transposed: false,
            bias: true,
        };
        let plan = KronPlan::new(vec![layout], vec![stack]).unwrap();
        let lam = 0.7;
        let got = plan.evaluate(&[f32(&w)], &[Some(f32(&b))], lam).unwrap();
        let wt = Tensor::cat(&[w.shallow_clone(), b.reshape([out, 1])], 1).set_requires_grad(true);
        let mut want = Tensor::zeros([], OPTS);
        for (star, a, g) in &tasks {
            // vec stacks columns: vec(ΔW̃) = ΔW̃ᵀ flattened.
            let d = (&wt - star).tr().reshape([-1]);
            let f = a.kron(g);
            want += 0.5 * lam * d.dot(&f.mv(&d));
        }
        let grad = Tensor::run_backward(&[&want], &[&wt], false, false).remove(0);
        let rel = |x: &Tensor, y: &Tensor| {
            (x.to_kind(Kind::Double) - y).norm().double_value(&[])
                / y.norm().double_value(&[]).max(1e-30)
        };
        assert!(rel(&got.value, &want) < 1e-5);
        assert!(rel(&got.weight_grads[0], &grad.narrow(1, 0, inp)) < 1e-5);
        assert!(rel(got.bias_grads[0].as_ref().unwrap(), &grad.select(1, inp)) < 1e-5);
    }

    #[test]
    fn a_stack_of_inconsistent_shapes_is_refused() {
        let t = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
        let stack = KronStack {
            layers: vec![0],
            star: t(&[1, 2, 3]),
            a: t(&[1, 2, 2]),
            g: t(&[1, 2, 2]),
        };
        let layout = KronLayout {
            transposed: false,
            bias: false,
        };
        let err = KronPlan::new(vec![layout], vec![stack]).err().unwrap();
        assert!(err.to_string().contains("stacks[0]"), "{err}");
    }
}
