//! The running sums of the Kronecker factors of one estimation.
//!
//! Per KFAC site (a layer whose weight has a `KfacForm`): Σ ã ãᵀ over its input rows (one per
//! sample and position), the count of those rows, and Σ_roots Σ_rows g gᵀ over its output
//! gradients. The roots already carry their weights (√p(c|x) for `exact`, 1/√S for `mc`), so the
//! sum over roots of (√w g)(√w g)ᵀ is the expectation the Fisher needs. Python divides A by the
//! rows and G by the samples (KFAC-expand; for one row per sample, Martens & Grosse 2015).

use crate::error::{value_err, Context, Result};
use crate::fisher::rules::Rule;
use std::sync::atomic::{AtomicI64, Ordering};
use tch::{Kind, Tensor};

/// Σ ã ãᵀ and Σ g gᵀ per site, in float32 on each site's device (the tensors Python passed in,
/// updated in place).
pub struct KfacSums {
    pub a: Vec<Tensor>,
    pub g: Vec<Tensor>,
    rows: Vec<AtomicI64>,
}

fn check_square(what: &str, i: usize, t: &Tensor) -> Result<()> {
    let s = t.size();
    if s.len() != 2 || s[0] != s[1] || t.kind() != Kind::Float {
        return value_err(format!(
            "{what}[{i}]: expected a square float32 matrix, got {:?} of shape {s:?}",
            t.kind()
        ));
    }
    Ok(())
}

impl KfacSums {
    /// Takes the (zero) sums to add into: `a[i]` `[in(+1), in(+1)]`, `g[i]` `[out, out]`.
    pub fn new(a: Vec<Tensor>, g: Vec<Tensor>) -> Result<Self> {
        if a.len() != g.len() {
            return value_err(format!(
                "a_sums, g_sums: expected one G per A, got {} and {}",
                a.len(),
                g.len()
            ));
        }
        for (i, (x, y)) in a.iter().zip(&g).enumerate() {
            check_square("a_sums", i, x)?;
            check_square("g_sums", i, y)?;
        }
        let rows = a.iter().map(|_| AtomicI64::new(0)).collect();
        Ok(Self { a, g, rows })
    }

    pub fn len(&self) -> usize {
        self.a.len()
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }

    /// The input rows added so far, per site.
    pub fn rows(&self) -> Vec<i64> {
        self.rows
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect()
    }

    fn check_site(&self, site: usize) -> Result<()> {
        if site >= self.len() {
            return value_err(format!(
                "kfac_site {site}: expected an index below {} (the number of KFAC sites)",
                self.len()
            ));
        }
        Ok(())
    }

    /// Adds Σ ã ãᵀ of one layer call's input (a 1 appended to each row when the site's A is one
    /// larger than the rows: the bias).
    pub fn add_input(&self, site: usize, rule: &dyn Rule, input: &Tensor) -> Result<()> {
        self.check_site(site)?;
        let rows = rule.kfac_input_rows(input)?;
        let mut total = self.a[site].shallow_clone();
        let (width, dim) = (rows.size()[1], total.size()[0]);
        let rows = if dim == width + 1 {
            let ones = Tensor::ones([rows.size()[0], 1], (Kind::Float, rows.device()));
            Tensor::f_cat(&[rows, ones], 1).ctx("KFAC input rows (bias column)")?
        } else if dim == width {
            rows
        } else {
            return value_err(format!(
                "kfac_site {site}: the layer's input rows have {width} columns, but its A is \
                 {dim}x{dim} (expected {width}, or {} with a bias)",
                width + 1
            ));
        };
        let rows = rows.to_device(total.device());
        let _ = total.f_addmm_(&rows.tr(), &rows).ctx("KFAC input factor")?;
        self.rows[site].fetch_add(rows.size()[0], Ordering::Relaxed);
        Ok(())
    }

    /// Adds Σ g gᵀ of one root's gradient w.r.t. one layer call's output.
    pub fn add_grad(&self, site: usize, rule: &dyn Rule, g: &Tensor) -> Result<()> {
        self.check_site(site)?;
        let rows = rule.kfac_grad_rows(g)?;
        let mut total = self.g[site].shallow_clone();
        if rows.size()[1] != total.size()[0] {
            return value_err(format!(
                "kfac_site {site}: the layer's output has {} features, but its G is {}x{}",
                rows.size()[1],
                total.size()[0],
                total.size()[0]
            ));
        }
        let rows = rows.to_device(total.device());
        let _ = total
            .f_addmm_(&rows.tr(), &rows)
            .ctx("KFAC output-gradient factor")?;
        Ok(())
    }
}
