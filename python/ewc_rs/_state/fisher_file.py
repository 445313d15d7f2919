"""Fisher files people can publish and reuse: a folder of safetensors shards and an index, laid out
as model weights are (``save_fisher``, ``load_fisher``), and the mapping they hold (``FisherDict``).

Layout of ``path/``:

- ``fisher-00001-of-0000K.safetensors`` ...: the tensors, in parameter-name order, a new shard when
  the next tensor would pass ``max_shard_bytes``; each shard's own metadata says
  ``{"format": "ewc_rs.fisher"}``;
- ``fisher.safetensors.index.json``: ``{"metadata": {...}, "weight_map": {name: shard file}}``.

The metadata (``FisherDict.metadata`` on load): ``format`` and ``version`` of this layout; ``kind``,
``likelihood``, ``samples``, ``tokens`` and ``mc_samples`` as the estimation counted them (from
``fisher_diag``'s result); ``dtype``; ``fingerprint``, the model's parameter names and shapes
(``{"names": [...], "shapes": [[...], ...]}``, every tensor of the file) with its SHA-256;
``mass``, the Fisher's sum in total and per tensor (from :func:`ewc_rs.fisher_summary`);
``ewc_rs`` and ``torch`` versions; ``user``, free-form fields (dataset, model revision, ...).

Loading reads shard by shard through memory-mapped ``safe_open`` and converts each tensor as it
goes, so it needs the output's memory and one tensor's worth more, not twice the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .fisher_dict import FisherDict, checked
from .fisher_stats import fisher_summary

FORMAT = "ewc_rs.fisher"
FILE_VERSION = 1
INDEX = "fisher.safetensors.index.json"
#: The default shard size: 5 GB, as model hubs split weights.
MAX_SHARD_BYTES = 5 * 10**9


def fingerprint(names: Iterable[str], shapes: Iterable[Iterable[int]]) -> dict[str, Any]:
    """The parameter names and shapes of a Fisher, and their SHA-256 (to compare with a model's)."""
    names, shapes = list(names), [list(map(int, s)) for s in shapes]
    digest = hashlib.sha256(json.dumps([names, shapes]).encode()).hexdigest()
    return {"names": names, "shapes": shapes, "sha256": digest}


def save_fisher(
    path: Union[str, os.PathLike[str]],
    fisher: Mapping[str, torch.Tensor],
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Writes a Fisher as a folder of safetensors shards plus an index (layout: the module doc).

    Args:
        path: the folder to write; it must not exist yet, or be empty.
        fisher: ``{parameter name: F}`` (e.g. from :func:`ewc_rs.fisher_diag`, whose ``.metadata``
            gives the kind, likelihood and counts).
        metadata: free-form JSON-serialisable fields (dataset, model revision, ...), stored under
            ``"user"``.
        max_shard_bytes: the largest shard (a tensor larger than it gets a shard of its own).

    Returns:
        The folder.

    Raises:
        ValueError: an empty mapping, a tensor that is not a finite non-negative float tensor, a
            ``path`` that exists and is not an empty folder, metadata that is not JSON, a
            ``max_shard_bytes`` that is not a positive integer. Nothing is written then.

    Examples:
        ```python
        import os
        import tempfile

        import torch
        from torch import nn
        from ewc_rs import fisher_diag, save_fisher

        model = nn.Linear(4, 3)
        fisher = fisher_diag(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], kind="exact")
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_fisher(os.path.join(tmp, "fisher"), fisher, metadata={"dataset": "synthetic"})
            assert sorted(os.listdir(folder)) == ["fisher-00001-of-00001.safetensors", "fisher.safetensors.index.json"]
        ```
    """
    tensors = checked(fisher)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: expected a positive integer, got {max_shard_bytes!r}")
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"path: {folder} exists and is not an empty folder")
    user = dict(metadata or {})
    try:
        json.dumps(user)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata: expected JSON-serialisable values ({e})") from None
    names = sorted(tensors)
    dtypes = sorted({str(tensors[n].dtype).replace("torch.", "") for n in names})
    known = getattr(fisher, "metadata", {})
    stats = fisher_summary({n: tensors[n] for n in names})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FILE_VERSION,
        **{k: known.get(k) for k in ("kind", "likelihood", "samples", "tokens", "mc_samples")},
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "fingerprint": fingerprint(names, (tensors[n].shape for n in names)),
        "mass": {"total": float(stats.total.sum()), "per_tensor": dict(zip(stats.names, map(float, stats.total)))},
        "ewc_rs": _version(),
        "torch": torch.__version__,
        "user": user,
    }
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        weight_map = {}
        for i, part in enumerate(shards):
            file = f"fisher-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(
                {n: tensors[n].detach().cpu().contiguous() for n in part},
                str(staging / file),
                metadata={"format": FORMAT},
            )
            weight_map.update(dict.fromkeys(part, file))
        (staging / INDEX).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1) + "\n")
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _version() -> str:
    try:
        return version("ewc_rs")
    except PackageNotFoundError:  # pragma: no cover - a source tree without an installed build
        return "unknown"


def load_fisher(
    path: Union[str, os.PathLike[str]],
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    names: Optional[Iterable[str]] = None,
    model: Optional[nn.Module] = None,
) -> FisherDict:
    """Reads a Fisher folder from :func:`save_fisher`, shard by shard (memory-mapped).

    Args:
        path: the folder.
        device: where the tensors go.
        dtype: their dtype (default: as stored).
        names: only these parameters (default: all).
        model: when given, every tensor read must be one of its parameters, of the same shape.

    Returns:
        ``{name: F}`` with the file's metadata at ``.metadata``.

    Raises:
        ValueError: not a Fisher folder (no index, or another format), a missing shard, an index
            naming a tensor its shard lacks, ``names`` the file lacks, a tensor that does not fit
            ``model``, a ``dtype`` that is not floating point.

    Examples:
        ```python
        import os
        import tempfile

        import torch
        from torch import nn
        from ewc_rs import fisher_diag, load_fisher, save_fisher

        model = nn.Linear(4, 3)
        fisher = fisher_diag(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], kind="exact")
        with tempfile.TemporaryDirectory() as tmp:
            save_fisher(os.path.join(tmp, "fisher"), fisher, metadata={"dataset": "synthetic"})
            loaded = load_fisher(os.path.join(tmp, "fisher"), model=model, dtype=torch.bfloat16)
        assert loaded["weight"].dtype == torch.bfloat16 and loaded["weight"].shape == (3, 4)
        assert loaded.metadata["kind"] == "exact" and loaded.metadata["user"] == {"dataset": "synthetic"}
        ```
    """
    folder = Path(path)
    index_file = folder / INDEX
    if not index_file.is_file():
        raise ValueError(f"path: {folder} is not a Fisher folder (no {INDEX})")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"path: {index_file} is not valid JSON ({e})") from None
    meta, weight_map = index.get("metadata"), index.get("weight_map")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(weight_map, dict):
        raise ValueError(f"path: {folder} is not an ewc_rs Fisher folder (format {FORMAT!r} expected in {INDEX})")
    if meta.get("version") != FILE_VERSION:
        raise ValueError(
            f"path: {folder} has Fisher file version {meta.get('version')!r}; this ewc_rs reads {FILE_VERSION}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected None or a floating-point torch.dtype, got {dtype!r}")
    wanted = sorted(weight_map) if names is None else list(names)
    missing = [n for n in wanted if n not in weight_map]
    if missing:
        raise ValueError(f"names: the file has no Fisher for {', '.join(map(repr, missing[:5]))}")
    params = dict(model.named_parameters()) if model is not None else None
    by_shard: dict[str, list[str]] = {}
    for n in wanted:
        by_shard.setdefault(weight_map[n], []).append(n)
    out = FisherDict(metadata=meta)
    for file, part in by_shard.items():
        shard = folder / file
        if not shard.is_file():
            raise ValueError(f"path: shard {file} named by {INDEX} is missing from {folder}")
        with safe_open(str(shard), framework="pt") as fh:
            if (fh.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"path: {shard} is not an ewc_rs Fisher shard")
            held = set(fh.keys())
            for n in part:
                if n not in held:
                    raise ValueError(f"path: {INDEX} puts '{n}' in {file}, which does not hold it")
                if params is not None:
                    shape = list(fh.get_slice(n).get_shape())
                    p = params.get(n)
                    if p is None or list(p.shape) != shape:
                        has = (
                            "the model has no such parameter" if p is None else f"the model's has shape {list(p.shape)}"
                        )
                        raise ValueError(f"model: the Fisher of '{n}' has shape {shape}, but {has}")
                t = fh.get_tensor(n)
                out[n] = t.to(device=device, dtype=dtype or t.dtype)
    return out
