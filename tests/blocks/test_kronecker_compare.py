"""fisher_kfac's factors against two independent KFAC implementations, curvlinops'
``KFACLinearOperator`` and nngeometry's ``PMatKFAC`` (optional: ``pip install 'ewc_rs[kfac-compare]'``),
on a CNN and an MLP applied to sequences [N, T, F], exact (type-2) Fisher, KFAC-expand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ewc_rs import fisher_kfac
from models import make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", ["cnn", "linear_seq"])
def test_factors_equal_curvlinops(name: str, seed: int) -> None:
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is optional: pip install 'ewc_rs[kfac-compare]'")
    from curvlinops.kfac import FisherType, KFACType

    model, batches = make_batches(name, seed=seed % 1000, data_seed=seed)
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        list(model.parameters()),
        batches,
        fisher_type=FisherType.TYPE2,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    ours = fisher_kfac(model, batches)
    n = sum(len(y) for _, y in batches)
    assert set(ours["kron"]) == set(op._gradient_covariances), f"seed={seed}"
    for m, (a, g) in ours["kron"].items():
        assert _rel(a, op._input_covariances[m]) < 1e-5, f"seed={seed} layer {m} A"
        assert _rel(g, op._gradient_covariances[m] / n) < 1e-5, f"seed={seed} layer {m} G (theirs sums over samples)"


def test_kronecker_products_equal_nngeometry(seed: int) -> None:
    pytest.importorskip("nngeometry", reason="nngeometry is optional: pip install 'ewc_rs[kfac-compare]'")
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC

    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed, batch_size=5)
    data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    fim = FIM(model, torch.utils.data.DataLoader(data, batch_size=5), PMatKFAC, variant="classif_logits")
    ours = fisher_kfac(model, batches)
    # nngeometry splits the scale between its factors differently: compare A ⊗ G.
    for (m, (a, g)), (a2, g2) in zip(ours["kron"].items(), fim.data.values()):
        assert _rel(torch.kron(a, g), torch.kron(a2, g2)) < 1e-4, f"seed={seed} layer {m}"


def test_ekfac_corrected_diagonal_equals_curvlinops(seed: int) -> None:
    """EKFAC's S against curvlinops' ``EKFACLinearOperator`` (bias as A's homogeneous coordinate,
    exact Fisher). An MLP with more samples than inputs, so that the eigenvalues are distinct and
    both eigenbases agree up to the signs of the vectors, which S does not see."""
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is optional: pip install 'ewc_rs[kfac-compare]'")
    from curvlinops.kfac import FisherType, KFACType

    from ewc_rs import EWC

    torch.manual_seed(seed % 100_000)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(10, 5, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(4)]
    op = curvlinops.EKFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        list(model.parameters()),
        batches,
        fisher_type=FisherType.TYPE2,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_per_example_loss_terms=1,
    )
    op.compute_eigenvalue_correction()
    ours = EWC(model, 1.0, structure="ekfac").consolidate(batches)["ekfac"]
    n = sum(len(y) for _, y in batches)
    for m, (_, _, s) in ours.items():
        theirs = op._corrected_eigenvalues[m]
        theirs = theirs if isinstance(theirs, torch.Tensor) else next(iter(theirs.values()))
        assert _rel(s, theirs / n) < 1e-4, f"seed={seed} layer {m} (theirs sums over samples)"
