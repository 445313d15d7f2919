"""Writes the saved-state test data of state format version 2 (ewc_rs 0.1.0 with the block model,
before the 8-bit Fisher): for every mode, structure and storage dtype, an ``EWC.save`` file and a ``torch.save``d
``state_dict``, the model's weights at which the penalty was measured, and that penalty's value and
gradient as this version computed them. Run once with the version being frozen; the files are test
data (``tests/state/test_migration.py``) and are never rewritten.

    python tests/state/data_v2/make_files.py tests/state/data_v2
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import ewc_rs
from ewc_rs import EWC


def model() -> nn.Module:
    """Conv (Kronecker under kfac/ekfac), Linear with and without bias, LayerNorm (diagonal under kfac)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 4, bias=False),
    )


def batches(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(2)]


def perturb(m: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    expected = {"ewc_rs": ewc_rs.__version__, "torch": torch.__version__, "cases": {}}
    for mode, structure, storage in itertools.product(
        ("separate", "online"), ("diag", "kfac", "ekfac"), ("float32", "bfloat16")
    ):
        name = f"{mode}_{structure}_{storage}"
        g = torch.Generator().manual_seed(len(expected["cases"]) + 1)
        torch.manual_seed(len(expected["cases"]) + 1)
        m = model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kfac: "these layers ... get the diagonal Fisher"
            ewc = EWC(m, lam=3.5, mode=mode, gamma=0.6, structure=structure, storage_dtype=getattr(torch, storage))
        for _ in range(2):
            ewc.consolidate(batches(g), kind="exact")
            perturb(m, g)
        for p in m.parameters():
            p.grad = None
        value = ewc.penalty(m)
        value.backward()
        ewc.save(str(out / f"{name}.safetensors"))
        torch.save(ewc.state_dict(), out / f"{name}.pt")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / f"{name}.model.safetensors"))
        save_file({n: p.grad.contiguous() for n, p in m.named_parameters()}, str(out / f"{name}.grad.safetensors"))
        expected["cases"][name] = {
            "mode": mode,
            "structure": structure,
            "storage_dtype": storage,
            "tasks": ewc.num_tasks,
            "penalty": float(value),
        }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
