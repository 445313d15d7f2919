"""``nn.RNN``/``nn.LSTM``/``nn.GRU`` for the Fisher engine: each layer unrolled, its projections Linear calls.

A recurrent layer keeps its weights as raw parameters used by one fused kernel, so no per-layer
rule can see them and they would go to the (slower) per-sample fallback. While a Fisher estimate
records, each eligible recurrent layer runs an equivalent unrolled forward instead, layer by
layer and direction by direction, where every projection is a call of an ``nn.Linear`` proxy
holding the layer's own parameter objects (``weight_ih_l0``, ``bias_hh_l0_reverse``, …):

- the input projection ``W_ih x_t + b_ih`` of every step is ONE Linear call over the whole
  sequence ``[N, T, in]``: the Linear rule's per-sample gradient is Σ_t g_t x_tᵀ;
- the hidden projection ``W_hh h_{t-1} + b_hh`` (and LSTM's ``W_hr (o_t ⊙ tanh c_t)`` with
  ``proj_size``) is one weight called once per step. Its per-sample gradient must be the sum over
  the steps before it is squared, which the Linear rule also gives for a sequence: the steps are
  recorded as ONE call whose input is the stacked ``h_{t-1}`` ``[N, T, H]`` and whose output is a
  tensor ``Z`` ``[N, T, G]`` whose slice ``Z[:, t]`` step t adds to its projection, so that the
  gradient of ``Z[:, t]`` is the gradient of step t's projection output: for GRU (and LSTM's
  ``W_hr``) a zero tensor; for RNN and LSTM, whose gates add the two projections,
  ``x_proj + b_hh`` itself. The bias ``b_hh`` stays in the hidden projection, so GRU's
  ``r ⊙ (W_hn h + b_hn)`` is exact.

Variants: ``num_layers`` > 1, ``bidirectional``, ``proj_size`` (LSTM), ``batch_first`` both ways,
biases on or off, initial states given or not, ``PackedSequence`` input (run padded in the
samples' own order, each step masked to the sequences still running, outputs packed again as
PyTorch packs them), RNN's ``tanh``/``relu``; PyTorch's gate orders (LSTM i, f, g, o; GRU r, z, n).

Guards, so that this can only make things faster, never wrong:
- only the exact types (a subclass may override ``forward``), parameters registered on the layer
  itself (no weight-norm or parametrization), batched input (3-d or packed) of the weights' dtype,
  and no dropout in training mode; any other call runs the original forward and hands the
  layer's parameters to the fallback from then on;
- the first call of each kind (packed or not, initial state given or not, dtype, device) is
  compared with the original forward; a difference beyond float rounding also hands the
  parameters to the fallback;
- the engine's own once-per-estimation check compares the rules' per-sample sums with autograd.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union, cast

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .proxies import linear_proxy

#: Relative difference between the unrolled and the original forward that counts as "not the same
#: function" (float32 rounding of T steps of small matmuls is far below it).
_VERIFY_RTOL = 1e-4

_TYPES = (nn.RNN, nn.LSTM, nn.GRU)
#: The mode strings of ``RNNBase`` the unrolled forward reproduces.
_MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")

#: Records ``(proxy, input, output)`` as one call of the proxy (see ``Recorder.record``).
RecordFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
State = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def eligible(m: nn.Module) -> bool:
    """A recurrent layer whose projections the unrolled forward reproduces."""
    if type(m) not in _TYPES or "forward" in m.__dict__:
        return False
    rnn = cast(nn.RNNBase, m)
    if rnn.mode not in _MODES or (rnn.proj_size > 0 and rnn.mode != "LSTM"):
        return False
    names = rnn._flat_weights_names
    return all(name in rnn._parameters and rnn._parameters[name] is not None for name in names)


class _Cell:
    """One (layer, direction) of a recurrent layer: the proxies of its projections."""

    def __init__(self, rnn: nn.RNNBase, layer: int, reverse: bool) -> None:
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")

        def get(name: str) -> Optional[torch.Tensor]:
            return cast(Optional[torch.Tensor], rnn._parameters.get(name + sfx))

        w_ih, w_hh = get("weight_ih"), get("weight_hh")
        assert w_ih is not None and w_hh is not None
        self.reverse = reverse
        self.ih = linear_proxy(w_ih, get("bias_ih"))  # W_ih x_t + b_ih, over the whole sequence at once
        self.hh = linear_proxy(w_hh, get("bias_hh"))  # W_hh h_{t-1} + b_hh, once per step
        w_hr = get("weight_hr")
        self.hr = None if w_hr is None else linear_proxy(w_hr, None)  # LSTM's projection W_hr m_t

    def proxies(self) -> list[nn.Linear]:
        return [p for p in (self.ih, self.hh, self.hr) if p is not None]


class Unrolled:
    """One recurrent layer's proxies and its unrolled forward (installed while recording)."""

    def __init__(self, rnn: nn.Module, on_failure: Callable[[list[torch.Tensor]], None]) -> None:
        assert isinstance(rnn, nn.RNNBase)
        self.rnn = rnn
        self.dirs = 2 if rnn.bidirectional else 1
        self.cells = [_Cell(rnn, layer, d == 1) for layer in range(rnn.num_layers) for d in range(self.dirs)]
        self.recording = False  # True while the Fisher engine records a forward pass
        self.failed = False
        self._record: Optional[RecordFn] = None
        self._verified: set[tuple] = set()
        self._on_failure = on_failure  # hands the layer's parameters to the fallback

    def parameters(self) -> list[torch.Tensor]:
        return [p for c in self.cells for lin in c.proxies() for p in (lin.weight, lin.bias) if p is not None]

    def proxies(self) -> list[nn.Linear]:
        return [lin for c in self.cells for lin in c.proxies()]

    def install(self, record: RecordFn) -> None:
        self._record = record
        self.rnn.forward = self.forward  # type: ignore[method-assign]

    def remove(self) -> None:
        self.rnn.__dict__.pop("forward", None)
        self._record = None

    def _fail(self) -> None:
        if not self.failed:
            self.failed = True
            self._on_failure(self.parameters())

    def forward(self, input: Any, hx: Optional[State] = None) -> tuple[Any, State]:
        rnn = self.rnn
        original = type(rnn).forward
        if not self.recording or self.failed:
            return original(rnn, input, hx)
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        weight = self.cells[0].ih.weight
        usable = (
            isinstance(data, torch.Tensor)
            and (packed or data.dim() == 3)
            and data.dtype == weight.dtype
            and data.device == weight.device
            and not (rnn.training and rnn.dropout > 0)
            and _state_ok(rnn, hx)
        )
        if not usable:
            self._fail()
            return original(rnn, input, hx)
        out = self._unrolled(input, hx)
        signature = (packed, hx is None, data.dtype, data.device)
        if signature not in self._verified:
            with torch.no_grad():
                ref = original(rnn, input, hx)
            if not _same(out, ref):
                self._fail()
                return original(rnn, input, hx)
            self._verified.add(signature)
        return out

    # ------------------------------------------------------------------ the unrolled forward
    def _unrolled(self, input: Any, hx: Optional[State]) -> tuple[Any, State]:
        rnn = self.rnn
        lengths: Optional[torch.Tensor] = None
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input, batch_first=True)  # [N, T, in], the samples' own order
        else:
            x = input if rnn.batch_first else input.transpose(0, 1)
        n, t = x.shape[0], x.shape[1]
        lstm = rnn.mode == "LSTM"
        hidden = rnn.hidden_size
        out_size = rnn.proj_size if rnn.proj_size > 0 else hidden
        layers = rnn.num_layers * self.dirs
        if hx is None:
            h0 = x.new_zeros(layers, n, out_size)
            c0 = x.new_zeros(layers, n, hidden) if lstm else None
        elif isinstance(hx, tuple):
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        # The original forward's checks of the sizes (its errors, not ours, on a wrong call).
        if isinstance(input, PackedSequence):
            checked: tuple[torch.Tensor, Optional[torch.Tensor]] = (input.data, input.batch_sizes)
        else:
            checked = (input, None)
        rnn.check_forward_args(checked[0], (h0, c0) if lstm else h0, checked[1])  # type: ignore[arg-type]
        mask = None
        if lengths is not None:
            steps = torch.arange(t).unsqueeze(1)
            mask = (steps < lengths.unsqueeze(0)).unsqueeze(-1).to(x.device)  # [T, N, 1]
        h_n: list[torch.Tensor] = []
        c_n: list[torch.Tensor] = []
        for layer in range(rnn.num_layers):
            outs = []
            for d in range(self.dirs):
                k = layer * self.dirs + d
                seq, h, c = self._direction(self.cells[k], x, h0[k], None if c0 is None else c0[k], mask)
                outs.append(seq)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outs[0] if self.dirs == 1 else torch.cat(outs, dim=-1)
        hs = torch.stack(h_n)
        state: State = (hs, torch.stack(c_n)) if lstm else hs
        if isinstance(input, PackedSequence):
            return _repack(x, input), state
        return (x if rnn.batch_first else x.transpose(0, 1).contiguous()), state

    def _direction(
        self,
        cell: _Cell,
        x: torch.Tensor,
        h: torch.Tensor,
        c: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One direction of one layer over ``x`` ``[N, T, in]``: its outputs ``[N, T, H_out]`` and
        its last hidden (and cell) state. Steps beyond a sequence's length (``mask`` False) keep
        the state as it was, so that the reverse direction starts at each sequence's own end.

        Step t's hidden projection is ``addmm(Z[:, t] + b_hh, h, W_hhᵀ)``: its gradient w.r.t.
        ``Z[:, t]`` is the projection's output gradient. For RNN and LSTM, whose gates add the two
        projections, ``Z = x_proj + b_hh`` itself (one add for the whole sequence), since the
        gradient of either summand is that of the gates."""
        mode = self.rnn.mode
        record = self._record
        assert record is not None
        n, t = x.shape[0], x.shape[1]
        hh, hr = cell.hh, cell.hr
        xp = cell.ih(x)  # one recorded Linear call over the sequence, [N, T, G]
        gi_rz: tuple[torch.Tensor, ...] = ()
        gi_n: tuple[torch.Tensor, ...] = ()
        if mode == "GRU":  # r ⊙ (W_hn h + b_hn): the projections stay apart, Z carries the hidden one
            hh_out = torch.zeros(n, t, hh.out_features, dtype=x.dtype, device=x.device, requires_grad=True)
            hid3 = xp.shape[-1] // 3
            gi_rz, gi_n = xp[..., : 2 * hid3].unbind(1), xp[..., 2 * hid3 :].unbind(1)
            gh0 = (hh_out if hh.bias is None else hh_out + hh.bias).unbind(1)
        else:
            # The gates add the two projections, so the gradient of step t's hidden projection is
            # that of x_proj[:, t] + b_hh: that sum serves as Z (a view when there is no b_hh).
            hh_out = xp.view_as(xp) if hh.bias is None else xp + hh.bias
            gh0 = hh_out.unbind(1)
        w_hh = hh.weight.t()
        z_hr = None
        zr: tuple[torch.Tensor, ...] = ()
        if hr is not None:
            z_hr = torch.zeros(n, t, hr.out_features, dtype=x.dtype, device=x.device, requires_grad=True)
            zr = z_hr.unbind(1)
        w_hr = None if hr is None else hr.weight.t()
        hid = self.rnn.hidden_size
        prev: list[torch.Tensor] = []  # h_{t-1} as the hidden projection reads it, in step order
        cells_in: list[torch.Tensor] = []  # o_t ⊙ tanh(c_t), the input of W_hr
        outs: list[torch.Tensor] = []
        order = list(range(t - 1, -1, -1)) if cell.reverse else list(range(t))
        for s in order:
            prev.append(h)
            proj = torch.addmm(gh0[s], h, w_hh)
            new_c = None
            if mode == "LSTM":
                assert c is not None
                # unsafe_chunk, as PyTorch's own cell: one backward node (a cat) instead of a
                # zero-filled gradient per slice
                i, f, g, o = proj.unsafe_chunk(4, dim=1)
                new_c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
                m = torch.sigmoid(o) * torch.tanh(new_c)
                if hr is not None and w_hr is not None:
                    cells_in.append(m)
                    new_h = torch.addmm(zr[s], m, w_hr)
                else:
                    new_h = m
            elif mode == "GRU":
                h_rz, h_n = proj.split([2 * hid, hid], dim=1)
                r, z = torch.sigmoid(gi_rz[s] + h_rz).unsafe_chunk(2, dim=1)
                cand = torch.tanh(torch.addcmul(gi_n[s], r, h_n))
                new_h = torch.addcmul(cand, z, h - cand)
            else:
                new_h = torch.tanh(proj) if mode == "RNN_TANH" else torch.relu(proj)
            if mask is not None:
                new_h = torch.where(mask[s], new_h, h)
                if new_c is not None:
                    assert c is not None
                    new_c = torch.where(mask[s], new_c, c)
            h, c = new_h, new_c
            outs.append(h)
        if cell.reverse:  # back to time order
            prev.reverse()
            cells_in.reverse()
            outs.reverse()
        record(hh, torch.stack(prev, dim=1), hh_out)
        if hr is not None and z_hr is not None:
            record(hr, torch.stack(cells_in, dim=1), z_hr)
        return torch.stack(outs, dim=1), h, c


def _state_ok(rnn: nn.RNNBase, hx: Optional[State]) -> bool:
    """An initial state of the form the layer takes for batched input (shapes are checked by the
    original forward on the first call, and by the comparison)."""
    if hx is None:
        return True
    if rnn.mode == "LSTM":
        return isinstance(hx, tuple) and len(hx) == 2 and all(isinstance(s, torch.Tensor) and s.dim() == 3 for s in hx)
    return isinstance(hx, torch.Tensor) and hx.dim() == 3


def _repack(padded: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """``padded`` ``[N, T, F]`` (the samples' own order) packed as ``like`` is: time-major rows of
    the sequences still running, in ``like``'s sorted order, with its indices."""
    sizes = like.batch_sizes
    order = like.sorted_indices
    if order is None:
        order = torch.arange(padded.shape[0])
    order = order.to(padded.device)
    t = padded.shape[1]
    rows = torch.cat([order[: int(b)] * t + s for s, b in enumerate(sizes.tolist())])
    data = padded.reshape(-1, padded.shape[-1]).index_select(0, rows)
    return PackedSequence(data, sizes, like.sorted_indices, like.unsorted_indices)


def _tensors(x: Any) -> list[Optional[torch.Tensor]]:
    """The tensors of a recurrent layer's result, flattened (a packed output as its data)."""
    if isinstance(x, PackedSequence):
        return [x.data, x.batch_sizes]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return [x]


def _same(ours: Any, ref: Any) -> bool:
    a_all, b_all = _tensors(ours), _tensors(ref)
    if len(a_all) != len(b_all):
        return False
    for a, b in zip(a_all, b_all):
        if a is None or b is None or a.shape != b.shape:
            return False
        a, b = a.detach().float(), b.detach().float()
        if not bool(torch.isfinite(b).all()) or not bool(torch.isfinite(a).all()):
            return False
        scale = float(b.abs().max()) if b.numel() else 0.0
        if b.numel() and float((a - b).abs().max()) > _VERIFY_RTOL * max(scale, 1e-6):
            return False
    return True
