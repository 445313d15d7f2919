"""Every public function and class has a Google-style docstring with its sections and one runnable example.

Checked as the API reference (mkdocstrings-python, ``docstring_style: google``) reads them, through griffe:
a summary, ``Args:`` naming exactly the signature's parameters, ``Returns:``/``Yields:`` unless it returns
None, ``Raises:``, and ``Examples:`` with one fenced ``python`` block (run by Sybil through the root
``conftest.py``), all parsed without a griffe warning.

The public API: the names in ``__all__`` of the modules below (constants and type aliases need no
sections) and the public methods of the classes among them. Not marked ``core``: griffe is a docs
dependency."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    "ewc_rs",
    "ewc_rs.checkpoint",
    "ewc_rs.cuda_kernel",
    "ewc_rs.distributed",
    "ewc_rs.merging",
    "ewc_rs.integrations.transformers",
    "ewc_rs.integrations.lightning",
    "ewc_rs.integrations.avalanche",
    "ewc_rs.integrations.peft",
]
#: Methods the frameworks call, not users (Lightning's ``on_*`` callbacks, Avalanche's ``before_*`` and
#: ``after_*`` plugin hooks, the ``transformers.Trainer`` methods ``EWCTrainer`` overrides): a summary is enough.
HOOK_PATTERN = re.compile(r"^(on|before|after)_[a-z_]+$")
TRAINER_OVERRIDES = {"ewc_rs.integrations.transformers.EWCTrainer." + name for name in ("compute_loss", "log")}
#: Public objects that raise nothing of their own for bad input, so no ``Raises:`` section: {public name: why}.
NO_RAISES = {
    "ewc_rs.FisherSummary": "a result record built by fisher_summary, which checks its input",
    "ewc_rs.FisherSummary.table": "formats the statistics it holds; any top gives a table",
    "ewc_rs.EWC.release_norm_stats": "removes hooks, if any; nothing to check",
    "ewc_rs.EWC.state_dict": "reads the stored state; nothing to check",
    "ewc_rs.cuda_kernel.status": "reads a string from the native module",
    "ewc_rs.cuda_kernel.disabled": "no argument; restores the setting whatever the block raises",
    "ewc_rs.cuda_kernel.nvrtc_dir": "looks for files; None when there are none",
    "ewc_rs.distributed.comm_stats": "reads this process's counter",
    "ewc_rs.distributed.reset_counter": "zeroes this process's counter",
    "ewc_rs.integrations.peft.lora_layers": "walks the model's modules; yields nothing when it has no LoRA layer",
    "ewc_rs.integrations.transformers.EWCTrainer.penalty_divisor": "reads the trainer's settings; any count is valid",
}


def _load() -> Any:
    return griffe.load(
        "ewc_rs",
        search_paths=[str(ROOT / "python")],
        docstring_parser="google",
        resolve_aliases=False,
    )


PACKAGE = _load()


def _target(obj: Any) -> Any:
    return obj.final_target if obj.is_alias else obj


def _exports(module: Any) -> list[str]:
    assert module.exports is not None, f"{module.path} has no __all__"
    return [str(name) for name in module.exports]


def public_objects() -> dict[str, Any]:
    """``{public name: griffe object}``: functions and classes in ``__all__``, and their classes' public methods
    and properties (a property is an attribute labelled ``property``)."""
    found: dict[str, Any] = {}
    for module_path in MODULES:
        module = PACKAGE if module_path == "ewc_rs" else PACKAGE[module_path.removeprefix("ewc_rs.")]
        for name in _exports(module):
            obj = _target(module[name])
            if not (obj.is_function or obj.is_class):
                continue  # a constant or a type alias (KINDS, __version__, distributed.Group)
            public = f"{module_path}.{name}"
            found[public] = obj
            if obj.is_class:
                for member_name, member in obj.members.items():
                    member = _target(member)
                    if member_name.startswith("_"):
                        continue
                    if member.is_function or (member.is_attribute and "property" in member.labels):
                        found[f"{public}.{member_name}"] = member
    return found


PUBLIC = public_objects()


def _is_hook(public: str) -> bool:
    return public in TRAINER_OVERRIDES or bool(HOOK_PATTERN.match(public.rsplit(".", 1)[1]))


def _is_property(obj: Any) -> bool:
    return obj.is_attribute and "property" in obj.labels


def _sections(obj: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for section in obj.docstring.parse("google"):
        out.setdefault(section.kind.value, []).append(section)
    return out


def _signature_names(obj: Any) -> list[str]:
    names = [p.name for p in obj.parameters]
    return names[1:] if names and names[0] in ("self", "cls") and (obj.is_class or obj.parent.is_class) else names


def _returns_none(obj: Any) -> bool:
    return obj.returns is None or str(obj.returns) == "None"


def test_the_public_api_is_found() -> None:
    """The enumeration sees what the README shows (a broken walk would check nothing)."""
    for name in (
        "ewc_rs.EWC",
        "ewc_rs.EWC.consolidate",
        "ewc_rs.fisher_diag",
        "ewc_rs.checkpoint.save",
        "ewc_rs.cuda_kernel.status",
        "ewc_rs.distributed.comm_stats",
        "ewc_rs.integrations.lightning.EWCCallback.consolidate",
    ):
        assert name in PUBLIC, sorted(PUBLIC)
    stale = set(NO_RAISES) - set(PUBLIC)
    assert not stale, f"NO_RAISES names objects that are not public: {sorted(stale)}"


@pytest.mark.parametrize("public", sorted(PUBLIC))
def test_public_docstring_has_the_google_sections(public: str) -> None:
    obj = PUBLIC[public]
    assert obj.docstring is not None and obj.docstring.value.strip(), f"{public}: no docstring"
    summary = obj.docstring.value.strip().splitlines()[0]
    assert summary.strip(), f"{public}: the docstring starts with an empty line"
    if _is_hook(public) or _is_property(obj):
        return  # called by the framework (or read as an attribute): the summary says what it does
    sections = _sections(obj)
    documented = [p.name.lstrip("*") for s in sections.get("parameters", []) for p in s.value]
    if obj.is_class and "dataclass" in obj.labels:  # a dataclass's fields are its parameters, as attributes
        documented += [a.name for s in sections.get("attributes", []) for a in s.value]
    assert sorted(documented) == sorted(_signature_names(obj)), (
        f"{public}: Args document {documented}, the signature has {_signature_names(obj)}"
    )
    if obj.is_function and not _returns_none(obj):
        wanted = "yields" if re.match(r"(Iterator|Generator|Iterable)\b", str(obj.returns)) else "returns"
        assert sections.get(wanted), f"{public}: returns {obj.returns} but has no {wanted.capitalize()}: section"
    if public in NO_RAISES:
        assert not sections.get("raises"), f"{public}: has Raises:, drop it from NO_RAISES"
    else:
        assert sections.get("raises"), f"{public}: no Raises: section (or an entry in NO_RAISES saying why)"
    examples = sections.get("examples", [])
    assert len(examples) == 1, f"{public}: expected one Examples: section, got {len(examples)}"
    texts = [text for kind, text in examples[0].value]
    fences = sum(text.count("```python") for text in texts)
    assert fences == 1, f"{public}: the Examples: section needs exactly one ```python block, has {fences}"


@contextmanager
def _griffe_warnings() -> Iterator[list[str]]:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("griffe")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_griffe_parses_every_public_docstring_without_warnings() -> None:
    warned = []
    for public, obj in sorted(PUBLIC.items()):
        if obj.docstring is None:
            continue  # reported by the test above
        with _griffe_warnings() as records:
            obj.docstring.parse("google")
        warned += [f"{public}: {message}" for message in records]
    assert not warned, "griffe warnings:\n" + "\n".join(warned)
