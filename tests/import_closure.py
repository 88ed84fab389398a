"""dvc.yaml's stages and the project files each one's command imports.

A stage's code deps must be exactly the files its command imports, at any depth
and inside functions too (``cantus.code_closure``), so an edit re-runs only the
stages it can change. ``tests/test_dvc_graph.py`` compares this against
dvc.yaml; run this file to print each stage's closure (what its ``deps`` list),
or with ``--write`` to put it in dvc.yaml in place of the code deps there, or
with ``--edit FILE...`` to count the stages an edit to each file invalidates:

    python tests/import_closure.py [--write]
    python tests/import_closure.py --edit generate/sample.py cantus/audio.py
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cantus.code_closure import closure

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("cantus", "ingest", "tokenize", "train", "generate", "evaluate")


def stages() -> dict[str, dict]:
    """dvc.yaml's stages with ``foreach`` expanded (``lm_train@semantic``, ...)."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in raw.items():
        if "foreach" in st:
            for item in st["foreach"]:
                text = yaml.safe_dump(st["do"]).replace("${item}", str(item))
                out[f"{name}@{item}"] = yaml.safe_load(text)
        else:
            out[name] = st
    return out


def stage_module(stage: dict) -> str:
    m = re.search(r"python -m (cantus[\w.]*)", " ".join(str(stage["cmd"]).split()))
    if not m:
        raise ValueError(f"stage command runs no cantus module: {stage['cmd']}")
    return m.group(1)


def imported(stage: dict) -> set[Path]:
    return {p.resolve() for p in closure(stage_module(stage))}


def declared_code(stage: dict) -> set[Path]:
    """The project .py files covered by a stage's deps (a folder covers every file in it)."""
    files: set[Path] = set()
    for dep in stage.get("deps", []):
        p = ROOT / dep
        if not str(dep).startswith(CODE_DIRS) or not p.exists():
            continue
        files.update(p.rglob("*.py") if p.is_dir() else [p])
    return {f.resolve() for f in files if "__pycache__" not in f.parts}


def rel(paths) -> list[str]:
    return sorted(str(p.relative_to(ROOT.resolve())) for p in paths)


def invalidated(path: str) -> tuple[set[str], set[str]]:
    """(stages an edit to ``path`` invalidates directly, those and every stage downstream)."""
    st = stages()

    def outs(stage: dict) -> list[str]:
        return [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs") or []]

    def reads(stage: dict, target: str) -> bool:
        return any(d == target or target.startswith(f"{d}/") or d.startswith(f"{target}/")
                   for d in map(str, stage.get("deps", [])))

    direct = {name for name, stage in st.items() if reads(stage, path)}
    seen, todo = set(direct), list(direct)
    while todo:
        for out in outs(st[todo.pop()]):
            for name, stage in st.items():
                if name not in seen and reads(stage, out):
                    seen.add(name)
                    todo.append(name)
    return direct, seen


def write_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's code deps in dvc.yaml (text edit: comments and order stay)."""
    closures = {name.split("@")[0]: rel(imported(st)) for name, st in stages().items()}
    lines, out, stage, i = path.read_text().splitlines(), [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        out.append(line)
        i += 1
        if line.strip() == "deps:" and stage in closures:
            indent = line[: len(line) - len(line.lstrip())] + "  "
            rest = []
            while i < len(lines) and lines[i].startswith(indent + "- "):
                dep = lines[i].strip()[2:]
                if not (dep.startswith(CODE_DIRS) and dep.endswith(".py")):
                    rest.append(lines[i])
                i += 1
            out += [f"{indent}- {f}" for f in closures[stage]] + rest
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--edit"]:
        for f in sys.argv[2:]:
            direct, all_ = invalidated(f)
            print(f"{f}: {len(direct)} of {len(stages())} stages, then {len(all_)}: "
                  f"{', '.join(sorted(direct))}")
        sys.exit(0)
    if "--write" in sys.argv[1:]:
        write_deps()
    for name, st in stages().items():
        print(f"{name}:")
        for f in rel(imported(st)):
            print(f"  - {f}")
