"""Rules of the code's shape that review alone would let drift: small signatures in the library
(state travels in objects, options by keyword), no clippy allowance for long signatures in the
Rust core, internal modules that never import the package ``__init__``, imports at module level,
and a one-line docstring saying each module's job. (The layers themselves: ``lint-imports``.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "python" / "ewc_rs"
#: Methods that mirror a PyTorch signature (``nn.MultiheadAttention.forward``) are exempt.
MIRRORS_TORCH = {("attention.py", "forward")}
#: What a library module may import inside a function: optional frameworks only.
OPTIONAL = ("matplotlib", "tqdm", "transformers", "lightning", "peft", "avalanche")


def _positional(fn: ast.FunctionDef) -> int:
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return len(names) - (1 if names and names[0] in ("self", "cls", "ctx") else 0)


def test_no_library_function_takes_more_than_six_positional_parameters() -> None:
    long = []
    for path in LIBRARY.rglob("*.py"):
        if "demo" in path.relative_to(LIBRARY).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and (path.name, node.name) not in MIRRORS_TORCH:
                if _positional(node) > 6:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, f"functions with more than 6 positional parameters: {long}"


def test_no_too_many_arguments_allowance_in_rust() -> None:
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.rs") if "too_many_arguments" in p.read_text()]
    assert not found, f"clippy::too_many_arguments allowed in {found}"


def _docstring_lines(tree: ast.AST) -> set[int]:
    """The line numbers of every class's and function's docstring inside ``tree``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            doc = node.body[0]
            assert doc.end_lineno is not None
            lines.update(range(doc.lineno, doc.end_lineno + 1))
    return lines


def test_ewc_class_is_a_facade_of_at_most_128_code_lines() -> None:
    """Signatures, blank lines and comments count; docstrings do not (their sections and runnable examples
    are required by ``test_docstrings.py``). 128: the former budget of 230 lines docstrings included, less
    the 102 docstring lines the class had then, so the code keeps the same room (since
    ``consolidate``/``consolidate_from`` took ``damping=``, whose check and use live in ``_structures``)."""
    tree = ast.parse((LIBRARY / "ewc.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EWC"]
    assert cls.end_lineno is not None
    lines = len(set(range(cls.lineno, cls.end_lineno + 1)) - _docstring_lines(cls))
    assert lines <= 128, f"EWC is {lines} lines of code: move logic to tasks/penalty/persistence/norm_stats"


def _library_modules() -> list[Path]:
    return [p for p in LIBRARY.rglob("*.py") if not {"demo", "integrations"} & set(p.relative_to(LIBRARY).parts)]


def test_internal_modules_import_no_name_from_the_package_init() -> None:
    """``from .. import X`` in the library names a module (a file, a package, or the native ``_core``),
    never a name the package ``__init__`` re-exports: that would run the import back up."""
    bad = []
    for path in _library_modules():
        if path.name == "__init__.py" and path.parent == LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            if node.module:
                base = base.joinpath(*node.module.split("."))
            for alias in node.names:
                target = base / alias.name
                if not (
                    target.with_suffix(".py").exists() or (target / "__init__.py").exists() or alias.name == "_core"
                ):
                    if base == LIBRARY:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}")
    assert not bad, f"names imported from the package __init__: {bad}"


def test_no_imports_inside_library_functions_but_optional_frameworks() -> None:
    inside = []
    for path in _library_modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                if not all(n.split(".")[0] in OPTIONAL for n in names):
                    inside.append(f"{path.relative_to(ROOT)}:{node.lineno} {names}")
    assert not inside, f"imports inside functions: {inside}"


def test_every_library_module_says_its_job() -> None:
    missing = [
        str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, f"modules without a docstring: {missing}"
