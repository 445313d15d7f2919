//! `nn.Conv1d` / `nn.Conv2d` (zero padding, any stride, dilation and groups): the per-sample
//! weight gradient is g_n · unfold(a_n)ᵀ per group, an unfold and a batched matmul.

use super::{sum_over_chunks, KfacForm, Rule, Slots, Want};
use crate::error::{value_err, Context, Result};
use crate::fisher::chunks::{Workspace, CHUNK, COLUMNS, INPUT};
use pyo3::prelude::*;
use std::sync::Arc;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct Conv {
    /// 1 for Conv1d, 2 for Conv2d.
    dims: usize,
    kernel: Vec<i64>,
    stride: Vec<i64>,
    padding: Vec<i64>,
    dilation: Vec<i64>,
    groups: i64,
}

/// Reads the geometry; `None` for what the rule does not cover: padding modes other than
/// zeros, and asymmetric `padding="same"` (an even effective kernel).
pub fn from_module(m: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Rule>>> {
    if m.getattr("padding_mode")?.extract::<String>()? != "zeros" {
        return Ok(None);
    }
    let kernel: Vec<i64> = m.getattr("kernel_size")?.extract()?;
    let dilation: Vec<i64> = m.getattr("dilation")?.extract()?;
    let pad = m.getattr("padding")?;
    let padding = if let Ok(mode) = pad.extract::<String>() {
        match symmetric_padding(&mode, &kernel, &dilation) {
            Some(p) => p,
            None => return Ok(None),
        }
    } else {
        pad.extract()?
    };
    let conv = Conv::new(
        kernel,
        m.getattr("stride")?.extract()?,
        padding,
        dilation,
        m.getattr("groups")?.extract()?,
    );
    conv.map(|c| Some(Arc::new(c) as Arc<dyn Rule>))
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
}

/// String padding as integers: `"valid"` is none, `"same"` pads d·(k−1)/2 on both sides when
/// that is whole (else `None`: PyTorch pads one side more, which the unfold does not do).
fn symmetric_padding(mode: &str, kernel: &[i64], dilation: &[i64]) -> Option<Vec<i64>> {
    match mode {
        "valid" => Some(vec![0; kernel.len()]),
        "same" => kernel
            .iter()
            .zip(dilation)
            .map(|(k, d)| {
                let total = d * (k - 1);
                (total % 2 == 0).then_some(total / 2)
            })
            .collect(),
        _ => None,
    }
}

impl Conv {
    pub fn new(
        kernel: Vec<i64>,
        stride: Vec<i64>,
        padding: Vec<i64>,
        dilation: Vec<i64>,
        groups: i64,
    ) -> Result<Self> {
        let dims = kernel.len();
        let ok = (dims == 1 || dims == 2)
            && [stride.len(), padding.len(), dilation.len()]
                .iter()
                .all(|&l| l == dims)
            && groups >= 1;
        if !ok {
            return value_err(format!(
                "conv rule: inconsistent geometry kernel={kernel:?} stride={stride:?} \
                 padding={padding:?} dilation={dilation:?} groups={groups}"
            ));
        }
        Ok(Self {
            dims,
            kernel,
            stride,
            padding,
            dilation,
            groups,
        })
    }

    /// The geometry in 2-d (a 1-d conv is a 2-d conv with height 1).
    fn as_2d(&self) -> Window {
        let pick = |x: &[i64], one: i64| {
            if self.dims == 2 {
                [x[0], x[1]]
            } else {
                [one, x[0]]
            }
        };
        Window {
            kernel: pick(&self.kernel, 1),
            stride: pick(&self.stride, 1),
            padding: pick(&self.padding, 0),
            dilation: pick(&self.dilation, 1),
        }
    }
}

/// A 2-d sliding window.
struct Window {
    kernel: [i64; 2],
    stride: [i64; 2],
    padding: [i64; 2],
    dilation: [i64; 2],
}

impl Window {
    /// `[N, C, H, W]` → `[N, C·kh·kw, L]`, the columns a convolution multiplies (as `im2col`).
    /// Built as one strided view of the zero-padded input and one copy: several times faster
    /// than libtorch's CPU `im2col`, which loops over samples. With a workspace, the padded input
    /// and the columns are written into its buffers (`INPUT`, `COLUMNS`: valid until the next
    /// chunk) instead of fresh memory, which on the CPU is page-faulted in for every chunk.
    fn unfold(&self, a: &Tensor, ws: Option<&Workspace>) -> Result<Tensor> {
        let (k, s, p, d) = (self.kernel, self.stride, self.padding, self.dilation);
        let padded = match ws {
            _ if p == [0, 0] => a.contiguous(),
            Some(ws) => {
                let sz = a.size();
                let shape = [sz[0], sz[1], sz[2] + 2 * p[0], sz[3] + 2 * p[1]];
                let mut buf = ws.buffer(INPUT, &shape, a.device());
                let _ = buf.f_zero_().ctx("conv rule (pad)")?;
                buf.f_narrow(2, p[0], sz[2])
                    .and_then(|t| t.f_narrow(3, p[1], sz[3]))
                    .and_then(|mut t| t.f_copy_(a))
                    .ctx("conv rule (pad)")?;
                buf
            }
            None => a
                .f_constant_pad_nd([p[1], p[1], p[0], p[0]])
                .ctx("conv rule (pad)")?,
        };
        let size = padded.size();
        let (n, c, h, w) = (size[0], size[1], size[2], size[3]);
        let oh = (h - d[0] * (k[0] - 1) - 1) / s[0] + 1;
        let ow = (w - d[1] * (k[1] - 1) - 1) / s[1] + 1;
        if oh <= 0 || ow <= 0 {
            return value_err(format!(
                "conv rule: input of spatial size {:?} is smaller than the kernel {k:?}",
                &size[2..]
            ));
        }
        let st = padded.stride();
        let windows = padded
            .f_as_strided(
                [n, c, k[0], k[1], oh, ow],
                [
                    st[0],
                    st[1],
                    st[2] * d[0],
                    st[3] * d[1],
                    st[2] * s[0],
                    st[3] * s[1],
                ],
                None,
            )
            .ctx("conv rule (unfold)")?;
        let cols = [n, c * k[0] * k[1], oh * ow];
        match ws {
            Some(ws) => {
                let buf = ws.buffer(COLUMNS, &cols, a.device());
                buf.f_view([n, c, k[0], k[1], oh, ow])
                    .and_then(|mut t| t.f_copy_(&windows))
                    .ctx("conv rule (unfold)")?;
                Ok(buf)
            }
            None => windows.f_reshape(cols).ctx("conv rule (unfold)"),
        }
    }
}

impl Conv {
    /// `per_sample`, with the weight gradients written into the workspace's `CHUNK` buffer (and
    /// the unfold into its own buffers) when one is given.
    fn per_sample_in(
        &self,
        a: &Tensor,
        g: &Tensor,
        want: Want,
        ws: Option<&Workspace>,
    ) -> Result<Slots> {
        let n = a.size()[0];
        let g = g.to_kind(Kind::Float);
        let (a, g) = if self.dims == 1 {
            (a.unsqueeze(2), g.unsqueeze(2))
        } else {
            (a.shallow_clone(), g)
        };
        let cout = g.size()[1];
        let cin = a.size()[1];
        let gr = self.groups;
        let g3 = g.reshape([n, gr, cout / gr, -1]);
        let w = if want.weight {
            let window = self.as_2d();
            let unf = window.unfold(&a.to_kind(Kind::Float), ws)?;
            let kk = window.kernel[0] * window.kernel[1];
            let unf = unf.reshape([n, gr, (cin / gr) * kk, -1]);
            if unf.size()[3] != g3.size()[3] {
                return value_err(format!(
                    "conv rule: unfolded input has {} positions but the output gradient has {}; \
                     the module's geometry does not match its input",
                    unf.size()[3],
                    g3.size()[3]
                ));
            }
            // [n, G, O/G, L] x [n, G, L, (I/G)K] -> [n, G, O/G, (I/G)K], as one batched GEMM
            // over (sample, group).
            let l = g3.size()[3];
            let (rows, cols) = (cout / gr, (cin / gr) * kk);
            let lhs = g3.reshape([n * gr, rows, l]);
            let rhs = unf.reshape([n * gr, cols, l]).transpose(1, 2);
            let gw = match ws {
                Some(ws) => {
                    let out = ws.buffer(CHUNK, &[n * gr, rows, cols], a.device());
                    lhs.f_bmm_out(&out, &rhs)
                }
                None => lhs.f_bmm(&rhs),
            }
            .ctx("conv rule (matmul)")?;
            let mut shape = vec![n, cout, cin / gr];
            shape.extend_from_slice(&self.kernel);
            Some(gw.reshape(shape.as_slice()))
        } else {
            None
        };
        let b = want
            .bias
            .then(|| g3.sum_dim_intlist(3, false, Kind::Float).reshape([n, cout]));
        Ok([w, b])
    }
}

impl Rule for Conv {
    fn per_sample(&self, a: &Tensor, g: &Tensor, want: Want) -> Result<Slots> {
        self.per_sample_in(a, g, want, None)
    }

    /// `chunked_sum_sq` with every chunk's intermediates (padded input, columns, per-sample
    /// gradients) in the workspace's buffers, squared in place.
    fn sum_sq(&self, a: &Tensor, g: &Tensor, want: Want, ws: &Workspace) -> Result<Slots> {
        sum_over_chunks(a, g, self.chunk_size(a, g, ws.budget), |a, g| {
            let mut ps = self.per_sample_in(a, g, want, Some(ws))?;
            for t in ps.iter_mut().flatten() {
                let _ = t.f_square_().ctx("conv rule (square)")?;
            }
            Ok(ps)
        })
    }

    /// Groups > 1 make the weight block-diagonal: no single Kronecker pair, so no KFAC form.
    fn kfac_form(&self, weight_shape: &[i64]) -> Option<KfacForm> {
        if self.groups != 1 || weight_shape.len() != 2 + self.dims {
            return None;
        }
        Some(KfacForm {
            inputs: weight_shape[1..].iter().product(),
            outputs: weight_shape[0],
            transposed: false,
        })
    }

    /// The unfolded patches, one row per sample and output position (Grosse & Martens 2016),
    /// columns in the weight's (channel, kernel row, kernel column) order.
    fn kfac_input_rows(&self, a: &Tensor) -> Result<Tensor> {
        let a = if self.dims == 1 {
            a.unsqueeze(2)
        } else {
            a.shallow_clone()
        };
        let unf = self.as_2d().unfold(&a.to_kind(Kind::Float), None)?;
        let cols = unf.size()[1];
        unf.f_transpose(1, 2)
            .and_then(|t| t.f_reshape([-1, cols]))
            .ctx("conv rule (KFAC input rows)")
    }

    fn kfac_grad_rows(&self, g: &Tensor) -> Result<Tensor> {
        let s = g.size();
        let (n, cout) = (s[0], s[1]);
        g.to_kind(Kind::Float)
            .f_reshape([n, cout, -1])
            .and_then(|t| t.f_transpose(1, 2))
            .and_then(|t| t.f_reshape([-1, cout]))
            .ctx("conv rule (KFAC gradient rows)")
    }

    /// The unfolded input plus the per-sample weight gradient (and the output gradient).
    fn per_sample_elems(&self, a: &Tensor, g: &Tensor) -> i64 {
        let k: i64 = self.kernel.iter().product();
        let cin = a.size()[1];
        let gs = g.size();
        let cout = gs[1];
        let l: i64 = gs[2..].iter().product();
        cin * k * l + cout * (cin / self.groups) * k + cout * l
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{autograd_per_sample, rel, OPTS};
    use super::*;
    use crate::fisher::chunks::Workspace;

    #[test]
    fn conv2d_matches_autograd_for_groups_dilation_stride_padding() {
        tch::manual_seed(2);
        let rule = Conv::new(vec![3, 2], vec![2, 1], vec![1, 2], vec![2, 1], 2).unwrap();
        let a = Tensor::randn([3, 4, 9, 7], OPTS);
        let w = Tensor::randn([6, 2, 3, 2], OPTS);
        let conv = |x: &Tensor, w: &Tensor| x.conv2d::<Tensor>(w, None, [2, 1], [1, 2], [2, 1], 2);
        let g = Tensor::randn(conv(&a, &w).size().as_slice(), OPTS);
        let want = autograd_per_sample(&a, &g, &w, conv);
        let got = rule.per_sample(&a, &g, Want::BOTH).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);
        // Chunking must not change the sum of squares.
        let tiny_budget = rule.sum_sq(&a, &g, Want::BOTH, &Workspace::new(1)).unwrap();
        let big_budget = rule
            .sum_sq(&a, &g, Want::BOTH, &Workspace::new(1 << 30))
            .unwrap();
        assert!(
            rel(
                tiny_budget[0].as_ref().unwrap(),
                big_budget[0].as_ref().unwrap()
            ) < 1e-6
        );
    }

    #[test]
    fn sum_sq_in_a_reused_workspace_matches_autograd() {
        // One workspace for several calls, as in an estimation: buffers left by a bigger call
        // (padded input, columns, per-sample gradients) must not leak into the next one.
        tch::manual_seed(4);
        let ws = Workspace::new(3 * 4 * 500);
        for (cin, cout, hw, pad, groups, n) in
            [(4, 6, 9, 1, 2, 5), (2, 3, 6, 2, 1, 3), (3, 4, 7, 0, 1, 4)]
        {
            let rule =
                Conv::new(vec![3, 3], vec![1, 1], vec![pad, pad], vec![1, 1], groups).unwrap();
            let a = Tensor::randn([n, cin, hw, hw], OPTS);
            let w = Tensor::randn([cout, cin / groups, 3, 3], OPTS);
            let conv = |x: &Tensor, w: &Tensor| {
                x.conv2d::<Tensor>(w, None, [1, 1], [pad, pad], [1, 1], groups)
            };
            let g = Tensor::randn(conv(&a, &w).size().as_slice(), OPTS);
            let want = autograd_per_sample(&a, &g, &w, conv)
                .square()
                .sum_dim_intlist(0, false, Kind::Float);
            let got = rule.sum_sq(&a, &g, Want::BOTH, &ws).unwrap();
            assert!(
                rel(got[0].as_ref().unwrap(), &want) < 1e-5,
                "cin {cin} pad {pad} groups {groups}"
            );
            let bias = g.sum_dim_intlist([2, 3].as_slice(), false, Kind::Float);
            let want_b = bias.square().sum_dim_intlist(0, false, Kind::Float);
            assert!(rel(got[1].as_ref().unwrap(), &want_b) < 1e-5);
        }
    }

    #[test]
    fn conv1d_matches_autograd() {
        tch::manual_seed(3);
        let rule = Conv::new(vec![3], vec![2], vec![1], vec![1], 1).unwrap();
        let a = Tensor::randn([4, 3, 11], OPTS);
        let w = Tensor::randn([5, 3, 3], OPTS);
        let conv = |x: &Tensor, w: &Tensor| x.conv1d::<Tensor>(w, None, [2], [1], [1], 1);
        let g = Tensor::randn(conv(&a, &w).size().as_slice(), OPTS);
        let want = autograd_per_sample(&a, &g, &w, conv);
        let got = rule.per_sample(&a, &g, Want::WEIGHT).unwrap();
        assert!(rel(got[0].as_ref().unwrap(), &want) < 1e-5);
    }

    #[test]
    fn same_padding_is_covered_only_when_symmetric() {
        assert_eq!(
            symmetric_padding("same", &[3, 5], &[1, 2]),
            Some(vec![1, 4])
        );
        assert_eq!(symmetric_padding("same", &[4], &[1]), None);
        assert_eq!(
            symmetric_padding("valid", &[4, 2], &[1, 1]),
            Some(vec![0, 0])
        );
    }

    #[test]
    fn inconsistent_geometry_is_refused() {
        let err = Conv::new(vec![3, 3], vec![1], vec![0, 0], vec![1, 1], 1).unwrap_err();
        assert!(err.to_string().contains("inconsistent geometry"), "{err}");
    }
}
