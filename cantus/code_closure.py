"""The project files a module imports, found by reading them (``ast``), not by running them.

A stage's output is a function of its params, its data and the code its
command imports, at any depth, including imports inside functions. This
module finds that code, so that

- ``dvc.yaml`` can list exactly those files as a stage's deps (checked by
  ``tests/test_dvc_graph.py``), and
- a trainer's run id and ingest's per-input cache key cover exactly the code
  that made a checkpoint or a cached item: an edit there starts afresh, an
  edit elsewhere (a README, a test, another stage) does not.

    python -m cantus.code_closure cantus.tokenize.codec.train   # its files, one a line
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

TOP = "cantus"


@lru_cache(maxsize=None)
def _package_dirs(name: str) -> tuple[Path, ...] | None:
    """The folders of package ``name`` (None when ``name`` is a plain module or not found).

    Only namespace packages are looked up, and only their parents are
    imported, so no project code runs (``cantus`` and its stage folders have no
    ``__init__.py``).
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    # an editable install adds a path-hook entry that is no folder
    return tuple(Path(p).resolve() for p in spec.submodule_search_locations if Path(p).is_dir())


def module_file(name: str) -> Path | None:
    """The ``.py`` file of project module ``name``; for ``pkg.mod.Attr``, ``pkg.mod``'s file.

    None for a package itself or a name outside the project.
    """
    parts = name.split(".")
    if parts[0] != TOP:
        return None
    for n in range(1, len(parts)):
        dirs = _package_dirs(".".join(parts[:n]))
        if dirs is None:
            return None
        candidates = [d / f"{parts[n]}.py" for d in dirs]
        found = [c for c in candidates if c.is_file()]
        if found:
            return found[0].resolve()
        if _package_dirs(".".join(parts[:n + 1])) is None:
            return None
    return None


def _package_of(path: Path) -> str | None:
    """The dotted package holding a project file, for relative imports."""
    for name in _known_packages():
        if path.parent in (_package_dirs(name) or ()):
            return name
    return None


@lru_cache(maxsize=None)
def _known_packages() -> tuple[str, ...]:
    """``cantus``, its stage packages (mapped from the repo root) and the folders below them."""
    names = [TOP] + [f"{TOP}.{s}" for s in ("ingest", "tokenize", "train", "generate",
                                            "evaluate")]
    todo = list(names)
    while todo:
        pkg = todo.pop()
        for d in _package_dirs(pkg) or ():
            for sub in d.iterdir():
                full = f"{pkg}.{sub.name}"
                if (sub.is_dir() and sub.name.isidentifier() and not sub.name.startswith("_")
                        and full not in names and _package_dirs(full)):
                    names.append(full)
                    todo.append(full)
    return tuple(n for n in names if _package_dirs(n))


def imported_names(path: Path) -> set[str]:
    """Every module an import anywhere in ``path`` names (``from a import b``: ``a`` and
    ``a.b``), relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = (_package_of(path) or "").split(".")
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def closure(module: str) -> set[Path]:
    """Project files reached from ``module`` through imports, its own file included."""
    start = module_file(module)
    if start is None:
        raise ValueError(f"{module} is not a module of the {TOP} project")
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(f for f in map(module_file, imported_names(path)) if f and f not in seen)
    return seen


def code_digest(*modules: str) -> str:
    """sha256 (16 hex) of the files the ``modules`` import, each named by its dotted module
    name (so a clone anywhere gives the same digest) and hashed with its bytes."""
    h = hashlib.sha256()
    for f in sorted(set().union(*(closure(m) for m in modules))):
        h.update(f"{_package_of(f)}.{f.stem}".encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m cantus.code_closure MODULE [MODULE ...]", file=sys.stderr)
        return 2
    for f in sorted(set().union(*(closure(m) for m in args))):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
