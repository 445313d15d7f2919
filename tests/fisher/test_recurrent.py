"""The unrolled ``nn.RNN``/``nn.LSTM``/``nn.GRU`` of the Fisher engine (``ewc_rs/_fisher/recurrent.py``).

Every variant (layers, directions, ``proj_size``, ``batch_first``, biases, initial states,
dropout between layers, packed sequences, a layer called twice) must match the float64
per-sample reference and the exact fallback the recurrent parameters took before, for every
kind; and none of its parameters may go to the fallback. The guards (a subclass with its own
forward, an unrolled forward that differs from the original, a weight also used outside the
layer, unbatched input) must send the parameters to the fallback and stay exact. Inputs are
drawn fresh; the seed is printed (``EWC_RS_TEST_SEED`` pins it).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from ewc_rs import fisher_diag, fisher_kfac
from ewc_rs._fisher import recording
from ewc_rs._fisher.api import estimate
from ewc_rs._fisher.options import draw_categorical, parse_options
from ewc_rs._fisher.recurrent import Unrolled
from reference import reference_fisher, relative_error

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("one_thread")]

TOL = 1e-4
IN, HID, T, C = 3, 5, 4, 4  # input features, hidden size, steps, classes
CELLS: dict[str, Callable[..., nn.Module]] = {
    "rnn_tanh": nn.RNN,
    "rnn_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k),
    "lstm": nn.LSTM,
    "gru": nn.GRU,
}


class Rec(nn.Module):
    """A recurrent layer and a Linear head reading its outputs and final states.

    ``batch_first``: the layout the model is given ([N, T, F]; transposed for the layer when
    False); ``state``: the initial state is computed from the input (so it carries gradient);
    ``packed``: the sequences (lengths in the input's last feature) are packed; ``twice``: the
    layer also reads the reversed sequence."""

    def __init__(self, cell: str, *, state: bool = False, packed: bool = False, twice: bool = False, **kw: Any) -> None:
        super().__init__()
        self.state, self.packed, self.twice = state, packed, twice
        self.rnn = CELLS[cell](IN, HID, **kw)
        self.lstm = isinstance(self.rnn, nn.LSTM)
        r = self.rnn
        dirs = 2 if r.bidirectional else 1
        out = r.proj_size if getattr(r, "proj_size", 0) else HID
        self.layers = r.num_layers * dirs
        self.init = nn.Linear(IN, self.layers * out)
        self.init_c = nn.Linear(IN, self.layers * HID)
        self.head = nn.Linear(dirs * out + out + (HID if self.lstm else 0), C)

    def _call(self, x: Tensor, lengths: Tensor) -> Tensor:
        r = self.rnn
        n = x.shape[0]
        hx: Any = None
        if self.state:
            h0 = torch.tanh(self.init(x[:, 0])).reshape(n, self.layers, -1).transpose(0, 1).contiguous()
            hx = h0
            if self.lstm:
                hx = (h0, self.init_c(x[:, 0]).reshape(n, self.layers, -1).transpose(0, 1).contiguous())
        seq = x if r.batch_first else x.transpose(0, 1)
        if self.packed:
            seq = pack_padded_sequence(seq, lengths, batch_first=r.batch_first, enforce_sorted=False)
        out, state = r(seq, hx)
        if self.packed:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
            mean = out.sum(dim=1) / lengths.unsqueeze(1).to(out.dtype)
        else:
            out = out if r.batch_first else out.transpose(0, 1)
            mean = out.mean(dim=1)
        h = state[0] if self.lstm else state
        feats = [mean, h[-1]] + ([state[1][-1]] if self.lstm else [])
        return self.head(torch.cat(feats, dim=1))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        y = self._call(x, lengths)
        if self.twice:
            y = y + self._call(x.flip(1), lengths)
        return y


#: name -> model factory (every cell), and the cells it applies to
VARIANTS: dict[str, tuple[Callable[[str], nn.Module], tuple[str, ...]]] = {
    "plain": (lambda c: Rec(c, batch_first=True), tuple(CELLS)),
    "seq_first": (lambda c: Rec(c), tuple(CELLS)),
    "no_bias": (lambda c: Rec(c, batch_first=True, bias=False), tuple(CELLS)),
    "two_layers_bidir": (lambda c: Rec(c, num_layers=2, bidirectional=True), tuple(CELLS)),
    "dropout_state": (lambda c: Rec(c, state=True, num_layers=2, dropout=0.5, batch_first=True), tuple(CELLS)),
    "packed": (lambda c: Rec(c, packed=True, batch_first=True), tuple(CELLS)),
    "packed_bidir_state": (
        lambda c: Rec(c, packed=True, state=True, num_layers=2, bidirectional=True),
        tuple(CELLS),
    ),
    "called_twice": (lambda c: Rec(c, twice=True, batch_first=True), ("gru", "lstm")),
    "proj": (lambda c: Rec(c, proj_size=2, batch_first=True), ("lstm",)),
    "proj_bidir_state": (
        lambda c: Rec(c, proj_size=2, num_layers=2, bidirectional=True, state=True, packed=True),
        ("lstm",),
    ),
}
CASES = [(v, c) for v, (_, cells) in VARIANTS.items() for c in cells]


def batches(seed: int) -> list[tuple[tuple[Tensor, Tensor], Tensor]]:
    """Two batches (sizes 4 and 3); lengths 1..T, the longest not always first."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for b in (4, 3):
        x = torch.randn(b, T, IN, generator=g)
        lengths = torch.randint(1, T + 1, (b,), generator=g)
        lengths[int(torch.randint(0, b, (1,), generator=g))] = T
        out.append(((x, lengths), torch.randint(0, C, (b,), generator=g)))
    return out


def mc_draws(model: nn.Module, data: list, samples: int, seed: int) -> list[Tensor]:
    """The labels ``fisher_diag(kind="mc", generator=Generator().manual_seed(seed))`` draws: per
    batch, from the float32 outputs of the model in eval mode (as tests/fisher/test_fisher.py)."""
    m = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [draw_categorical(m(*x).float(), samples, g) for x, _ in data]


def fisher(model: nn.Module, data: list, kind: str, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed) if kind == "mc" else None
    return fisher_diag(model, data, kind=kind, mc_samples=3, generator=gen)


def reference(model: nn.Module, data: list, kind: str, seed: int) -> dict[str, Tensor]:
    if kind == "mc":
        labels = mc_draws(model, data, 3, seed)
        return reference_fisher(model, data, kind="mc", mc_samples=3, mc_labels=labels)
    return reference_fisher(model, data, kind=kind)


def recurrent_part(f: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in f.items() if k.startswith("rnn.")}


def fallback_of(model: nn.Module, data: list, kind: str) -> list[str]:
    """The parameters that took the per-sample fallback in an estimation of ``kind``."""
    opts = parse_options(kind, mc_samples=3, generator=torch.Generator().manual_seed(0) if kind == "mc" else None)
    return estimate(model, data, opts).fallback


def check_close(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    err = relative_error(got, want)
    err_rnn = relative_error(recurrent_part(got), recurrent_part(want))
    assert err <= TOL and err_rnn <= TOL, f"{what}: relative error {err:.3g} (recurrent part {err_rnn:.3g})"


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
@pytest.mark.parametrize(("variant", "cell"), CASES, ids=[f"{v}-{c}" for v, c in CASES])
def test_recurrent_variants_match_reference_and_fallback(
    variant: str, cell: str, kind: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(seed % 100_000)
    model = VARIANTS[variant][0](cell)
    data = batches(seed)
    got = fisher(model, data, kind, seed)
    check_close(got, reference(model, data, kind, seed), f"seed={seed} {variant} {cell} {kind} vs reference")
    fallback = fallback_of(model, data, kind)
    assert fallback == [], f"seed={seed} {variant} {cell} {kind}: parameters in the fallback: {fallback}"
    assert "forward" not in model.rnn.__dict__, "the unrolled forward was left installed"
    # the same estimate with the recurrent layer in the exact fallback, as before the unrolling
    monkeypatch.setattr(recording, "recurrent_eligible", lambda m: False)
    before = fisher(model, data, kind, seed)
    assert set(recurrent_part(before)) <= set(fallback_of(model, data, kind))
    check_close(got, before, f"seed={seed} {variant} {cell} {kind} vs the fallback")


@pytest.mark.parametrize("cell", list(CELLS))
def test_batched_kind_matches_reference(cell: str, seed: int) -> None:
    """``batched`` squares whole-batch gradients (no recording): the recurrent layer as it is."""
    torch.manual_seed(seed % 100_000)
    model = Rec(cell, num_layers=2, bidirectional=True, packed=True)
    data = batches(seed)
    check_close(
        fisher_diag(model, data, kind="batched"), reference_fisher(model, data, kind="batched"), f"seed={seed} {cell}"
    )


def test_kfac_gives_the_recurrent_parameters_their_diagonal(seed: int) -> None:
    """The proxies are no KFAC sites: ``fisher_kfac`` gives the recurrent weights the diagonal."""
    torch.manual_seed(seed % 100_000)
    model = Rec("lstm", num_layers=2, bidirectional=True, batch_first=True)
    data = batches(seed)
    got = fisher_kfac(model, data, kind="empirical")
    assert set(got["kron"]) <= {"head", "init", "init_c"}
    want = recurrent_part(reference_fisher(model, data, kind="empirical"))
    check_close(recurrent_part(got["diag"]), want, f"seed={seed} kfac diag")


@pytest.mark.parametrize("frozen", ["rnn.weight_ih_l0", "rnn.bias_hh_l0", "all"])
def test_frozen_recurrent_parameters(frozen: str, seed: int) -> None:
    """Frozen parameters have no Fisher; the others still run through the rules, exactly. A layer
    whose parameters are all frozen is not unrolled."""
    torch.manual_seed(seed % 100_000)
    model = Rec("gru", num_layers=2, batch_first=True)
    for name, p in model.named_parameters():
        p.requires_grad_(not (name == frozen or (frozen == "all" and name.startswith("rnn."))))
    data = batches(seed)
    got = fisher_diag(model, data, kind="exact")
    check_close(got, reference_fisher(model, data, kind="exact"), f"seed={seed} frozen {frozen}")
    assert frozen not in got
    opts = parse_options("exact")
    assert estimate(model, data, opts).fallback == []
    unrolled = recording.cover_model(model).recurrent
    assert len(unrolled) == (0 if frozen == "all" else 1)


class OwnForward(nn.LSTM):
    """A subclass whose forward adds to the output: the unrolled forward would be wrong."""

    def forward(self, input: Any, hx: Optional[Any] = None) -> Any:  # type: ignore[override]
        out, state = super().forward(input, hx)
        return out * 1.5, state


class Shared(nn.Module):
    """A GRU whose input weight is also used outside the layer (the rule check must notice)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(IN, HID, batch_first=True)
        self.head = nn.Linear(HID + 3 * HID, C)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        extra = F.linear(x.mean(dim=1), self.rnn.weight_ih_l0)
        return self.head(torch.cat([out[:, -1], extra], dim=1))


class Unbatched(nn.Module):
    """An LSTM called sample by sample with unbatched [T, F] input (no sample dim: not unrolled)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(IN, HID)
        self.head = nn.Linear(HID, C)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.head(torch.stack([self.rnn(xi)[0][-1] for xi in x]))


def _differs(self: Unrolled, input: Any, hx: Any) -> Any:
    out, state = Unrolled._unrolled_original(self, input, hx)  # type: ignore[attr-defined]
    return out * 1.01, state


@pytest.mark.parametrize("case", ["subclass", "differs", "shared_weight", "unbatched"])
def test_guards_send_to_fallback_and_stay_exact(case: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(seed % 100_000)
    model: nn.Module
    if case == "subclass":
        model = Rec("lstm", batch_first=True)
        model.rnn = OwnForward(IN, HID, batch_first=True)
    elif case == "differs":
        model = Rec("gru", num_layers=2, batch_first=True)
        monkeypatch.setattr(Unrolled, "_unrolled_original", Unrolled._unrolled, raising=False)
        monkeypatch.setattr(Unrolled, "_unrolled", _differs)
    elif case == "unbatched":
        model = Unbatched()
    else:
        model = Shared()
    data = batches(seed)
    for kind in ("exact", "empirical"):
        got = fisher_diag(model, data, kind=kind)
        check_close(got, reference_fisher(model, data, kind=kind), f"seed={seed} {case} {kind}")
        fallback = set(fallback_of(model, data, kind))
        expected = {"rnn.weight_ih_l0"} if case == "shared_weight" else set(recurrent_part(got))
        assert expected <= fallback, f"seed={seed} {case}: {sorted(expected - fallback)} not in the fallback"
        assert "forward" not in model.rnn.__dict__


def test_forward_is_restored_even_on_error(seed: int) -> None:
    torch.manual_seed(seed % 100_000)
    model = Rec("lstm", batch_first=True)
    (x, lengths), _ = batches(seed)[0]
    with pytest.raises(ValueError):
        fisher_diag(model, [((x, lengths), torch.full((x.shape[0],), C + 5))], kind="empirical")
    assert "forward" not in model.rnn.__dict__, "the unrolled forward was left installed"
