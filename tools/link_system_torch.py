"""Let a virtual environment reuse this interpreter's torch, and nothing else of its site-packages.

``python tools/link_system_torch.py VENV`` (the Makefile runs it with the interpreter that
creates the venv): when that interpreter has torch installed (a GPU box with a system-wide
CUDA torch), symlink torch and the distributions it requires (nvidia-*, triton, sympy, ...)
into ``VENV/system-torch/`` and put that directory on the venv's path with a ``.pth`` file.
The venv is created without ``--system-site-packages``, so every other package (pytest,
transformers, ...) is the venv's own; pip sees the linked torch as installed and leaves it.
Without a torch here it does nothing, and the Makefile installs one into the venv.

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import sysconfig
from pathlib import Path

# Build tools are installed into the venv by the Makefile, never linked.
NOT_LINKED = {"pip", "setuptools", "wheel"}
LINK_DIR = "system-torch"
PTH_FILE = "system-torch.pth"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(root: str) -> list[md.Distribution]:
    """``root`` and every installed distribution it requires, transitively.  Requirements that
    only an extra asks for are left out; a requirement that is not installed is skipped."""
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = _norm(todo.pop())
        if name in seen or name in NOT_LINKED:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            if re.search(r"\bextra\s*==", req):
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0])
    return list(seen.values())


def top_level_entries(dist: md.Distribution) -> set[Path]:
    """The files and directories a distribution puts directly in its site-packages directory."""
    base = Path(dist.locate_file("")).resolve()
    entries = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__"):
            entries.add(base / parts[0])
    if not entries:  # no RECORD (not installed by pip): its metadata directory and its import packages
        meta = getattr(dist, "_path", None)
        if meta is not None:
            entries.add(Path(meta).resolve())
        for name in (dist.read_text("top_level.txt") or "").split():
            entries.update(p for p in (base / name, base / f"{name}.py") if p.exists())
    return {e for e in entries if e.exists()}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], "\nusage: python tools/link_system_torch.py VENV", file=sys.stderr)
        return 2
    venv = Path(argv[0]).resolve()
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    link_dir = venv / LINK_DIR
    try:
        torch = md.distribution("torch")
    except md.PackageNotFoundError:
        print(f"link_system_torch: {sys.executable} has no torch; the venv installs its own")
        (site / PTH_FILE).unlink(missing_ok=True)
        return 0
    if not site.is_dir():
        print(f"link_system_torch: {site} does not exist; create the venv first", file=sys.stderr)
        return 1
    link_dir.mkdir(exist_ok=True)
    dists = requirement_closure("torch")
    for dist in dists:
        for entry in top_level_entries(dist):
            link = link_dir / entry.name
            if link.is_symlink() and link.resolve() != entry:
                link.unlink()
            if not link.exists():
                link.symlink_to(entry, target_is_directory=entry.is_dir())
    (site / PTH_FILE).write_text(str(link_dir) + "\n")
    print(f"link_system_torch: the venv reuses torch {torch.version} from {torch.locate_file('')} "
          f"({len(dists)} distributions linked into {link_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
