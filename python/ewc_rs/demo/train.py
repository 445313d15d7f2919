"""Plain PyTorch pieces shared by the demos: a tensor loader, the training loop, accuracy.

The training loop is the one a user writes::

    loss = F.cross_entropy(model(x), y) + ewc.penalty(model)

:func:`accuracy` switches the model to eval mode and **restores** the mode each submodule had
before (the seed article's ``get_accuracy`` did not, so its task B was trained with BatchNorm
in eval mode by accident; see the docs' Results page, "Demos").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .datasets import DataError, Split, candidate_dirs, find_dataset, load_split

__all__ = [
    "TensorLoader",
    "accuracy",
    "freeze_norm_stats",
    "load_data",
    "set_threads",
    "subset",
    "train_task",
]

Penalty = Callable[[nn.Module], torch.Tensor]


class TensorLoader:
    """Mini-batches ``(x, y)`` of in-memory tensors; re-iterable, reshuffled on each pass.

    A light stand-in for ``DataLoader(TensorDataset(x, y), batch_size, shuffle)`` (no per-item
    indexing and collation), usable wherever ``ewc_rs`` expects a loader.

    Args:
        x, y: tensors with the same first dimension.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a new permutation for every pass.
        seed: seed of the shuffling generator.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 100, *, shuffle: bool = False, seed: int = 0
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.batch_size, self.shuffle = x, y, int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.x.device)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]
        else:
            for i in range(0, n, self.batch_size):
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]


def freeze_norm_stats(model: nn.Module) -> None:
    """Puts every BatchNorm layer in eval mode (uses and keeps its running statistics).

    Call it after ``model.train()``: the rest of the model trains normally. This is what
    ``EWC(norm_stats="freeze")`` does for a consolidated model; the demo uses it for the rows
    without an ``EWC`` object so that all rows share one BatchNorm policy.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def train_task(
    model: nn.Module,
    loader: TensorLoader,
    *,
    epochs: int,
    penalty: Optional[Penalty] = None,
    lr: float = 1e-3,
    freeze_norm: bool = False,
    progress: Union[bool, str] = False,
) -> list[float]:
    """Trains ``model`` on one task with a fresh Adam: ``loss = ce + penalty(model)``.

    Args:
        model: the network (trained in place).
        loader: the task's training batches.
        epochs: passes over ``loader``.
        penalty: e.g. ``ewc.penalty``; None for plain fine-tuning.
        lr: Adam's learning rate.
        freeze_norm: keep BatchNorm layers in eval mode (see :func:`freeze_norm_stats`).
        progress: show a tqdm bar (a string is used as its description).

    Returns:
        The mean training loss (cross-entropy + penalty) of each epoch.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=epochs * len(loader), desc=progress if isinstance(progress, str) else "train", leave=False)
    losses = []
    try:
        for _ in range(epochs):
            model.train()
            if freeze_norm:
                freeze_norm_stats(model)
            total, count = 0.0, 0
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                if penalty is not None:
                    loss = loss + penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
                if bar is not None:
                    bar.update(1)
            losses.append(total / max(count, 1))
    finally:
        if bar is not None:
            bar.close()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Top-1 accuracy in eval mode; every submodule's train/eval mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    finally:
        for m, mode in modes:
            m.training = mode
    return correct / max(len(x), 1)


def subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of a fixed-seed permutation (all samples when ``n`` is None)."""
    if n is None or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_data(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, *, seed: int = 0) -> Split:
    """:func:`.datasets.load_split`, strict about a folder the user names.

    With ``data_dir`` (the demo's ``--data``), the data set must be found in that folder or its
    usual sub-folders (``mnist/``, ``MNIST/raw``, ...); otherwise :class:`DataError` lists where
    it looked. Without it, the search order of :func:`.datasets.candidate_dirs` applies
    (``$EWC_RS_DATA``, ``~/.torch``, Debian's ``/usr/share/datasets/fashion-mnist``; torchvision's
    layout in each root).
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(
                f"--data {data_dir}: no such directory. Give a folder that holds '{name}' IDX files "
                "(t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], optionally the train pair), "
                "directly or in a 'mnist/' / 'fashion-mnist/' sub-folder or torchvision's "
                "'MNIST/raw' / 'FashionMNIST/raw' layout; or leave --data out and set "
                "$EWC_RS_DATA to such a folder."
            )
        root_abs = Path(os.path.abspath(root))
        try:
            files = find_dataset(name, root)  # type: ignore[arg-type]
        except DataError:
            files = None
        if files is None or not (files.directory == root_abs or root_abs in files.directory.parents):
            looked = [
                str(d)
                for d in candidate_dirs(name, root)  # type: ignore[arg-type]
                if d == root_abs or root_abs in d.parents
            ]
            raise DataError(
                f"--data {data_dir}: data set '{name}' not found there. Folders looked at:\n  "
                + "\n  ".join(looked)
                + "\nEach needs t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
                "(train-*-ubyte[.gz] optional). MNIST: http://yann.lecun.com/exdb/mnist/ or "
                "torchvision.datasets.MNIST(root, download=True); Fashion-MNIST: "
                "https://github.com/zalandoresearch/fashion-mnist, "
                "torchvision.datasets.FashionMNIST(root, download=True) or Debian's "
                "'apt install dataset-fashion-mnist'."
            )
    return load_split(name, data_dir, seed=seed)  # type: ignore[arg-type]


def set_threads(threads: Optional[int] = None) -> int:
    """Sets torch's intra-op threads (also used by the ``ewc_rs`` core): ``threads``, else
    ``$EWC_RS_THREADS``, else 1.

    One thread is the default on purpose: the demo's models are small MLPs (batch 100), which gain
    little from more threads, and OpenMP threads that compete with other processes for the cores
    spin and stall. Measured on the 2-core development machine under load: 1.4 ms per training
    step with 1 thread, 60-230 ms with 2. Returns the number set.
    """
    if threads is None:
        env = os.environ.get("EWC_RS_THREADS")
        threads = int(env) if env else 1
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def to_device(tensors: Sequence[torch.Tensor], device: Union[str, torch.device]) -> list[torch.Tensor]:
    """Moves tensors to ``device``."""
    return [t.to(device) for t in tensors]
