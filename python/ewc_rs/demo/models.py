"""The demo's two models, as plain ``torch.nn`` modules.

* :func:`seed_model`: the seed article's network for MNIST → Fashion-MNIST:
  Flatten → Linear(784, 100) → ReLU → BatchNorm1d(100) → Linear(100, 100) → ReLU →
  BatchNorm1d(100) → Linear(100, 10).
* :func:`permuted_mlp`: the permuted-MNIST network (Kirkpatrick et al. 2017 use 2 hidden layers):
  Flatten → Linear(784, 256) → ReLU → Linear(256, 256) → ReLU → Linear(256, 10).

Both take images ``[N, 28, 28]`` (or already flat ``[N, 784]``) and return logits ``[N, 10]``.
Weights depend only on ``seed`` (the global random state is left untouched).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["seed_model", "permuted_mlp"]


def _seeded(seed: int, build):  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def seed_model(seed: int = 0) -> nn.Sequential:
    """The seed article's MLP with two BatchNorm layers (10 + 79.5k parameters)."""
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 100),
            nn.ReLU(),
            nn.BatchNorm1d(100),
            nn.Linear(100, 100),
            nn.ReLU(),
            nn.BatchNorm1d(100),
            nn.Linear(100, 10),
        ),
    )


def permuted_mlp(seed: int = 0, hidden: int = 256) -> nn.Sequential:
    """MLP 784-256-256-10 with ReLU, no normalisation layers (269k parameters)."""
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        ),
    )
