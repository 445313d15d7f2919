"""Writes ``<dist>/index.html``: a find-links page listing the ewc_rs wheels in ``<dist>``.

``make wheels`` runs it after building one wheel per torch line; pip then picks the wheel of a
torch line by its local version: ``pip install ewc_rs==0.1.0+torch213 -f dist/index.html``.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path


def index_page(wheels: list[str]) -> str:
    """A simple HTML page with one link per wheel file name (links relative to the page).

    Args:
        wheels: wheel file names.

    Returns:
        The page's text.
    """
    links = "\n".join(f'<a href="{html.escape(w)}">{html.escape(w)}</a><br>' for w in sorted(wheels))
    return f"<!DOCTYPE html>\n<html><head><title>ewc_rs wheels</title></head><body>\n{links}\n</body></html>\n"


def main(argv: list[str]) -> int:
    """Writes the page for the folder ``argv[0]`` (default ``dist``); fails when it holds no wheel."""
    dist = Path(argv[0] if argv else "dist")
    wheels = [p.name for p in dist.glob("ewc_rs-*.whl")]
    if not wheels:
        print(f"no ewc_rs wheel in {dist}", file=sys.stderr)
        return 1
    (dist / "index.html").write_text(index_page(wheels), encoding="utf-8")
    print(f"{dist / 'index.html'}: {len(wheels)} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
