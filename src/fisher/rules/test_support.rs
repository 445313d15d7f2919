//! What the per-rule tests share: a per-sample gradient by autograd, one sample at a time
//! (libtorch's own conv/linear/norm ops are the reference).

use tch::{Device, Kind, Tensor};

pub const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Per-sample gradient of Σ g_n ⊙ f(a_n, θ) w.r.t. θ, by autograd, stacked over samples.
pub fn autograd_per_sample(
    a: &Tensor,
    g: &Tensor,
    theta: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> Tensor {
    let n = a.size()[0];
    let rows: Vec<Tensor> = (0..n)
        .map(|i| {
            let th = theta.detach().set_requires_grad(true);
            let y = f(&a.narrow(0, i, 1), &th);
            let s = (y * g.narrow(0, i, 1)).sum(Kind::Float);
            Tensor::run_backward(&[s], &[&th], false, false).remove(0)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}
