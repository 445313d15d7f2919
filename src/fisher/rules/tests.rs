//! Each rule against autograd, one sample at a time (libtorch's own conv/linear/norm ops).

use super::*;
use tch::{Device, Kind, Tensor};

const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Per-sample gradient of Σ g_n ⊙ f(a_n, θ) w.r.t. θ, by autograd, stacked over samples.
fn autograd_per_sample(
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

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

#[test]
fn linear_rule_matches_autograd_and_its_gemm_shortcut() {
    tch::manual_seed(1);
    let a = Tensor::randn([5, 3, 4], OPTS);
    let g = Tensor::randn([5, 3, 6], OPTS);
    let w = Tensor::randn([6, 4], OPTS);
    let want = autograd_per_sample(&a, &g, &w, |x, w| x.linear::<Tensor>(w, None));
    let got = Rule::Linear.per_sample(&a, &g, [true, false]).unwrap();
    assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);

    let a2 = Tensor::randn([7, 4], OPTS);
    let g2 = Tensor::randn([7, 6], OPTS);
    let fast = Rule::Linear
        .sum_sq(&a2, &g2, [true, true], 1 << 20)
        .unwrap();
    let ps = Rule::Linear.per_sample(&a2, &g2, [true, true]).unwrap();
    for (f, p) in fast.iter().zip(ps.iter()) {
        let slow = p
            .as_ref()
            .unwrap()
            .square()
            .sum_dim_intlist(0, false, Kind::Float);
        assert!(rel(f.as_ref().unwrap(), &slow) < 1e-5);
    }
}

#[test]
fn conv_rule_matches_autograd_for_groups_dilation_stride_padding() {
    tch::manual_seed(2);
    let geo = ConvGeometry::new(vec![3, 2], vec![2, 1], vec![1, 2], vec![2, 1], 2).unwrap();
    let a = Tensor::randn([3, 4, 9, 7], OPTS);
    let w = Tensor::randn([6, 2, 3, 2], OPTS);
    let conv = |x: &Tensor, w: &Tensor| x.conv2d::<Tensor>(w, None, [2, 1], [1, 2], [2, 1], 2);
    let g = Tensor::randn(conv(&a, &w).size().as_slice(), OPTS);
    let want = autograd_per_sample(&a, &g, &w, conv);
    let rule = Rule::Conv(geo);
    let got = rule.per_sample(&a, &g, [true, true]).unwrap();
    assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);
    // Chunking must not change the sum of squares.
    let tiny_budget = rule.sum_sq(&a, &g, [true, true], 1).unwrap();
    let big_budget = rule.sum_sq(&a, &g, [true, true], 1 << 30).unwrap();
    assert!(
        rel(
            tiny_budget[0].as_ref().unwrap(),
            big_budget[0].as_ref().unwrap()
        ) < 1e-6
    );
}

#[test]
fn conv1d_rule_matches_autograd() {
    tch::manual_seed(3);
    let geo = ConvGeometry::new(vec![3], vec![2], vec![1], vec![1], 1).unwrap();
    let a = Tensor::randn([4, 3, 11], OPTS);
    let w = Tensor::randn([5, 3, 3], OPTS);
    let conv = |x: &Tensor, w: &Tensor| x.conv1d::<Tensor>(w, None, [2], [1], [1], 1);
    let g = Tensor::randn(conv(&a, &w).size().as_slice(), OPTS);
    let want = autograd_per_sample(&a, &g, &w, conv);
    let got = Rule::Conv(geo).per_sample(&a, &g, [true, false]).unwrap();
    assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);
}

#[test]
fn group_norm_rule_matches_autograd() {
    tch::manual_seed(4);
    let a = Tensor::randn([3, 6, 5], OPTS);
    let g = Tensor::randn([3, 6, 5], OPTS);
    let w = Tensor::randn([6], OPTS);
    let gn = |x: &Tensor, w: &Tensor| x.group_norm::<&Tensor>(3, Some(w), None, 1e-5, false);
    let want = autograd_per_sample(&a, &g, &w, gn);
    let rule = Rule::GroupNorm {
        groups: 3,
        eps: 1e-5,
    };
    let got = rule.per_sample(&a, &g, [true, true]).unwrap();
    assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-4);
}

#[test]
fn embedding_sum_of_squares_sums_repeated_rows_before_squaring() {
    // Sample 0 looks up row 2 twice: its per-sample gradient for row 2 is g₀ + g₁.
    let idx = Tensor::from_slice(&[2i64, 2, 0, 1]).reshape([2, 2]);
    let g = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0]).reshape([2, 2, 1]);
    let rule = Rule::Embedding {
        num_embeddings: 3,
        padding_idx: Some(0),
    };
    let sq = rule.sum_sq(&idx, &g, [true, false], 1 << 20).unwrap();
    let got: Vec<f32> = Vec::try_from(sq[0].as_ref().unwrap().reshape([-1])).unwrap();
    // row 0 is padding (no gradient), row 1: 4² from sample 1, row 2: (1+2)² from sample 0.
    assert_eq!(got, vec![0.0, 16.0, 9.0]);
    let dense = rule.per_sample(&idx, &g, [true, false]).unwrap();
    let dense_sq = dense[0]
        .as_ref()
        .unwrap()
        .square()
        .sum_dim_intlist(0, false, Kind::Float);
    assert!(rel(&dense_sq, sq[0].as_ref().unwrap()) < 1e-6);
}
