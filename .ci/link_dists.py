"""Link installed distributions, with everything they require, into one folder.

    python .ci/link_dists.py DEST torch [torchvision ...]

Run by the CI venv's python: for each named distribution and, recursively, the distributions it
requires (with the extras it asks for, markers evaluated here), every top-level entry it installed
(package folders, single-file modules, its .dist-info) is symlinked into DEST. A fresh venv whose
site-packages holds a ``.pth`` line naming DEST then imports torch (5.5 GB with its CUDA wheels)
without a second install, and sees nothing else of the CI venv: no timm, transformers, pillow...
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _top_levels(dist) -> set[str]:
    names = set()
    for file in dist.files or ():
        parts = Path(file).parts
        if parts and parts[0] != ".." and not parts[0].endswith(".pth") and parts[0] != "__pycache__":
            names.add(parts[0])
    return names


def closure(roots: list[str]) -> dict[str, object]:
    """Each distribution needed by ``roots``, by canonical name."""
    found: dict[str, object] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset()) for root in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            if name in roots:
                raise SystemExit(f"link_dists: {name} is not installed") from None
            continue  # an optional or platform-only requirement that is not here
        found[key[0]] = dist
        for line in dist.requires or ():
            req = Requirement(line)
            envs = [{"extra": extra} for extra in ("", *extras)]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[0])
    dest.mkdir(parents=True, exist_ok=True)
    dists = closure(argv[1:])
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        for top in _top_levels(dist):
            link = dest / top
            if not link.is_symlink() and (site / top).exists():
                link.symlink_to(site / top)
    print(f"linked {len(dists)} distributions into {dest}: {', '.join(sorted(dists))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
