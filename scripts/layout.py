"""Writes the layout section of the docs' architecture page from the code: the package's layers as the import contract
states them (``pyproject.toml``, ``[tool.importlinter]``), and every source file with the first
sentence of its own docstring (Python) or ``//!`` comment (Rust), so that the section cannot drift.

    python scripts/layout.py            # prints the section
    python scripts/layout.py --write    # replaces it in docs/explanation/architecture.md (between the markers)
    python scripts/layout.py --check    # exits 1 when the page differs (tests/project/test_layout.py)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the venv's Python is 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- layout:start (scripts/layout.py --write) -->", "<!-- layout:end -->"
WIDTH = 44
PAGE = "docs/explanation/architecture.md"


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = " ".join(text.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bw\.r\.t)(?<!\bFig)\.(\s|$)", para)
    return para[: match.start() + 1] if match else para


def python_doc(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return first_sentence(doc) if doc else "(no docstring)"


def rust_doc(path: Path) -> str:
    lines = [ln[3:].strip() for ln in path.read_text().splitlines() if ln.startswith("//!")]
    return first_sentence("\n".join(lines)) if lines else "(no //! comment)"


def _row(name: str, doc: str) -> str:
    return f"{name:<{WIDTH}} {doc}" if len(name) < WIDTH else f"{name}\n{'':<{WIDTH}} {doc}"


def layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [f"  {layer}" for layer in contract["layers"]]


def section() -> str:
    """The layout section's body (between the markers)."""
    out = [
        "Python layers, top to bottom (imports run downward only; `a | b`: siblings that do not import",
        "each other; checked by `lint-imports` in `make test`), each under `python/ewc_rs/`:",
        "",
        "```",
    ]
    out += layers()
    out += ["```", "", "```"]
    for path in sorted((ROOT / "src").rglob("*.rs")):
        out.append(_row(str(path.relative_to(ROOT)), rust_doc(path)))
    package = ROOT / "python" / "ewc_rs"
    for path in sorted(package.rglob("*.py"), key=lambda p: (p.parent != package, str(p))):
        name = path.relative_to(ROOT)
        if path.name == "__init__.py" and path.parent != package:
            name = path.parent.relative_to(ROOT)
        folder = path.name == "__init__.py" and path.parent != package
        out.append(_row(f"{name}{'/' if folder else ''}", python_doc(path)))
    tests = ROOT / "tests"
    for sub in sorted(p for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for path in sorted(sub.glob("*.py")):
            out.append(_row(str(path.relative_to(ROOT)), python_doc(path)))
    out.append("```")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the section in the page")
    ap.add_argument("--check", action="store_true", help="exit 1 when the page's section differs")
    args = ap.parse_args()
    body = section()
    if not (args.write or args.check):
        print(body, end="")
        return 0
    readme = ROOT / PAGE
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{PAGE} has no layout markers ({START} ... {END})", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{body}{END}{tail}"
    if args.check:
        if new != text:
            print(f"{PAGE}'s layout section is out of date: run python scripts/layout.py --write", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
