"""The labels ``kind="mc"`` draws (``draw_categorical``: inverse CDF in two levels) follow
softmax(logits): frequencies of many draws against p by a chi-square test, on fresh flat, moderate
and very peaked distributions, vocabularies of one block, several blocks with a shorter last one,
and classes of zero mass; positions whose target is ``ignore_index`` draw nothing, and leave the
generator as the other positions do."""

from __future__ import annotations

import math

import pytest
import torch

from ewc_rs._fisher.options import draw_categorical, parse_options

pytestmark = pytest.mark.core

DRAWS = 400_000
#: Reject at z > 5 on the Wilson–Hilferty normal approximation of the chi-square statistic
#: (a correct sampler fails it with probability ≈ 3e-7 per check, whatever the seed; a sampler
#: off by 10% on two classes holding a tenth of the mass each is caught, see
#: ``test_chi_square_catches_a_wrong_distribution``).
Z_MAX = 5.0


def _chi_square_z(counts: torch.Tensor, p: torch.Tensor, draws: int) -> float:
    """z of the chi-square statistic of ``counts`` against ``p`` (float64); classes expected fewer
    than 5 times pooled into one cell, which is dropped when it too expects fewer than 5 (with
    its count: a class of tiny mass drawn even once is not caught here, see
    ``test_zero_mass_never_drawn``)."""
    expected = p.double() * draws
    small = expected < 5
    obs = counts.double()
    cells_e = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    cells_o = torch.cat([obs[~small], obs[small].sum().reshape(1)])
    if cells_e[-1] < 5:
        cells_e, cells_o = cells_e[:-1], cells_o[:-1]
    stat = float(((cells_o - cells_e) ** 2 / cells_e).sum())
    k = cells_e.numel() - 1  # degrees of freedom
    if k == 0:  # all the mass in one cell (a very peaked p): nothing to compare here
        return 0.0
    if k == 1:  # the statistic is Z² for a standard normal Z
        return math.sqrt(stat)
    a = 2.0 / (9.0 * k)
    return ((stat / k) ** (1.0 / 3.0) - (1.0 - a)) / math.sqrt(a)


def _logits(classes: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes, generator=g) * scale


CASES = {
    # name: (classes, scale of the logits)
    "flat_5": (5, 0.05),
    "peaked_5": (5, 8.0),
    "flat_1000": (1000, 0.1),  # 7 blocks of 128 and one of 104
    "moderate_1000": (1000, 2.0),
    "peaked_1000": (1000, 6.0),  # most of the mass on a few classes, the tail far below 1/draws
    "moderate_300": (300, 1.5),  # 2 blocks and one of 44
}


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_match_softmax(name: str, seed: int) -> None:
    classes, scale = CASES[name]
    logits = _logits(classes, scale, seed)
    p = torch.softmax(logits.double(), dim=0)
    # Two rows of the same logits: one draws many times, the other as many rows of one draw each.
    draws = draw_categorical(logits.reshape(1, classes), DRAWS, torch.Generator().manual_seed(seed))
    assert draws.shape == (1, DRAWS) and draws.dtype == torch.long
    z = _chi_square_z(torch.bincount(draws.reshape(-1), minlength=classes), p, DRAWS)
    assert z < Z_MAX, f"seed={seed} {name}: chi-square z={z:.2f} against softmax (S draws of one row)"
    rows = draw_categorical(logits.expand(DRAWS // 8, classes), 8, torch.Generator().manual_seed(seed + 1))
    assert rows.shape == (DRAWS // 8, 8)
    z = _chi_square_z(torch.bincount(rows.reshape(-1), minlength=classes), p, DRAWS)
    assert z < Z_MAX, f"seed={seed} {name}: chi-square z={z:.2f} against softmax (rows of 8 draws)"


def test_chi_square_catches_a_wrong_distribution(seed: int) -> None:
    """The test above can fail: frequencies drawn from p are rejected against p shifted by one
    class, and against p with 10% of their mass moved between two classes holding a tenth each
    (at 5% the expected z was about 7, and in 1 of 40 seeds below 5: the test failed by chance; at
    10% it was at least 17.8 over the same 40 seeds)."""
    logits = _logits(300, 1.5, seed)
    p = torch.softmax(logits.double(), dim=0)
    counts = torch.bincount(
        draw_categorical(logits.reshape(1, -1), DRAWS, torch.Generator().manual_seed(seed)).reshape(-1), minlength=300
    )
    assert _chi_square_z(counts, p.roll(1), DRAWS) > 10 * Z_MAX
    big = torch.zeros(300)
    big[:2] = math.log(0.1 / 0.8) + torch.logsumexp(logits[2:], 0)  # classes 0 and 1: 0.1 each
    mixed = torch.cat([big[:2], logits[2:]])
    q = torch.softmax(mixed.double(), dim=0)
    counts = torch.bincount(
        draw_categorical(mixed.reshape(1, -1), DRAWS, torch.Generator().manual_seed(seed)).reshape(-1), minlength=300
    )
    assert _chi_square_z(counts, q, DRAWS) < Z_MAX
    wrong = q.clone()
    wrong[0] *= 1.10
    wrong[1] = q[0] + q[1] - wrong[0]
    assert _chi_square_z(counts, wrong, DRAWS) > Z_MAX


def test_zero_mass_never_drawn(seed: int) -> None:
    """Classes at -inf, or so far below the maximum that exp underflows in float32, are never
    drawn; a row with a single class of positive mass always draws it, whichever block holds it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 700, generator=g)
    logits[:, 128:256] = -float("inf")  # a whole block of zero mass
    logits[:, 600:] = -200.0  # most of the last blocks: exp underflows to 0
    logits[5] = -float("inf")
    logits[5, 699] = 0.0  # one class in the shorter last block
    draws = draw_categorical(logits, 5000, g)
    got = draws[:5]
    assert not bool(((got >= 128) & (got < 256)).any()), "a class of a zero-mass block was drawn"
    assert not bool((got >= 600).any()), "a class with underflowing mass was drawn"
    assert bool((draws[5] == 699).all())
    one = torch.full((3, 128), -float("inf"))
    one[torch.arange(3), torch.tensor([0, 64, 127])] = 1.0
    assert draw_categorical(one, 100, g).tolist() == [[0] * 100, [64] * 100, [127] * 100]


def test_reproducible_and_independent_of_blocking(seed: int) -> None:
    """Same generator state, same draws; the rows' draws do not depend on how many rows are
    drawn at once (the uniforms come from one call), and the generator ends in the same state."""
    logits = torch.randn(40, 3, 257, generator=torch.Generator().manual_seed(seed)) * 3
    a = draw_categorical(logits, 2, torch.Generator().manual_seed(seed))
    b = draw_categorical(logits, 2, torch.Generator().manual_seed(seed))
    assert a.shape == (40, 3, 2) and torch.equal(a, b)
    c = draw_categorical(logits, 2, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(a, c)
    import ewc_rs._fisher.options as options

    old = options._DRAW_ROWS_BYTES
    options._DRAW_ROWS_BYTES = 4 * 257 * 7  # 7 rows per step
    try:
        d = draw_categorical(logits, 2, torch.Generator().manual_seed(seed))
    finally:
        options._DRAW_ROWS_BYTES = old
    assert torch.equal(a, d)
    # A causal LM's shifted logits (a non-contiguous view) draw as their contiguous copy does.
    longer = torch.cat([logits, torch.randn(40, 1, 257)], dim=1)
    e = draw_categorical(longer[:, :-1], 2, torch.Generator().manual_seed(seed))
    assert torch.equal(a, e)


def test_ignored_positions_draw_nothing(seed: int) -> None:
    """``draw_mc`` with targets: a position whose target is ``ignore_index`` gets label 0 (its
    root weighs it 0), every other position the label it draws without targets, and the
    generator is left in the same state."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 9, 300, generator=g) * 2
    targets = torch.randint(0, 300, (4, 9), generator=g)
    ignored = torch.rand(4, 9, generator=g) < 0.4
    ignored[:, 0] = False
    targets[ignored] = -100
    opts = parse_options("mc", "causal_lm", mc_samples=3, generator=torch.Generator().manual_seed(seed))
    with_targets = opts.draw_mc(logits, targets)
    after_a = torch.rand(4, generator=opts.generator)
    opts = parse_options("mc", "causal_lm", mc_samples=3, generator=torch.Generator().manual_seed(seed))
    without = opts.draw_mc(logits)
    after_b = torch.rand(4, generator=opts.generator)
    assert with_targets.shape == (4, 9, 3)
    assert bool((with_targets[ignored] == 0).all())
    assert torch.equal(with_targets[~ignored], without[~ignored])
    assert torch.equal(after_a, after_b)
    assert bool((without[ignored] != 0).any()), "the ignored positions would have drawn labels"
