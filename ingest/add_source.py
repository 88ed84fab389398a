"""``cantus add-source``: bring music from outside the repository under DVC as an ingest source.

Goes in: PATH, a folder of audio (``~/music``), a glob (``'~/music/**/*.flac'``), a URL
list or a MusicCaps-format CSV, and optionally ``--kind``, ``--name`` and ``--captions``.
Comes out, in the repository (the working directory):

- ``data/sources/NAME`` (a folder; for a glob, the glob's base folder) or
  ``data/sources/NAME.txt|.csv`` (a URL list or CSV), made with ``dvc import-url``: its
  content hash and its origin are in ``data/sources/NAME.dvc``, so ``git`` versions the
  source and ``dvc push`` shares it; the ingest stage depends on ``data/sources``, so a
  new or changed source re-runs ingest and everything after it;
- ``data/sources/NAME.captions.csv|.jsonl`` for ``--captions FILE``: the table with each
  row's ``path`` rewritten relative to ``data/sources`` (a plain file, versioned by git);
- one more entry in ``ingest.sources`` of params.yaml (comments and layout kept).

It refuses, naming the problem: a missing path, a path inside the repository, a name
that is taken, and an origin that was added before (``--update`` brings in its changes
with ``dvc update``).

    cantus add-source ~/music                      # -> data/sources/music
    cantus add-source '~/rec/**/*.flac' --name rec --captions ~/rec/captions.csv
    cantus add-source ~/lists/urls.txt             # a URL list (kind url_list)
    cantus add-source --update music               # after files in ~/music changed
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from cantus.config import ConfigError, from_dict, read_params
from cantus.ingest.params import SOURCE_KINDS, IngestConfig
from cantus.ingest.sources import read_caption_table

SOURCES = Path("data/sources")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GLOB_CHARS = re.compile(r"[*?[]")


class AddSourceError(RuntimeError):
    """DVC could not import the source."""


def infer_kind(path: str) -> str:
    """folder, glob, url_list or musiccaps_csv, from what ``path`` is."""
    if _GLOB_CHARS.search(path) and not Path(path).exists():
        return "glob"
    p = Path(path)
    if p.is_dir():
        return "folder"
    return "musiccaps_csv" if p.suffix.lower() == ".csv" else "url_list"


def glob_base(pattern: str) -> tuple[Path, str]:
    """``'/m/**/*.flac'`` -> (``/m``, ``'**/*.flac'``): the folder before the first
    wildcard, and the rest of the pattern."""
    parts = Path(pattern).parts
    i = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    return Path(*parts[:i]) if i else Path("."), str(Path(*parts[i:]))


def _origin(path: str, kind: str) -> Path:
    """The file or folder to import for ``path`` of ``kind``; FileNotFoundError /
    ConfigError naming the path and what it should be."""
    if kind == "glob":
        base, _ = glob_base(path)
        if not base.is_dir():
            raise FileNotFoundError(f"{path}: no such folder {base}")
        if not [m for m in glob.glob(path, recursive=True) if Path(m).is_file()]:
            raise FileNotFoundError(f"{path}: the glob matches no file")
        return base.resolve()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if kind == "folder" and not p.is_dir():
        raise ConfigError(f"{path}: --kind folder needs a folder")
    if kind in ("url_list", "musiccaps_csv") and not p.is_file():
        raise ConfigError(f"{path}: --kind {kind} needs a file")
    return p.resolve()


def default_name(origin: Path) -> str:
    """A source name from a folder or file name: letters, digits, '.', '_', '-'."""
    stem = origin.name if origin.is_dir() else origin.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-_")


def _dvc_files(repo: Path) -> dict[Path, dict[str, Any]]:
    out = {}
    for f in sorted((repo / SOURCES).glob("*.dvc")):
        try:
            out[f] = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError:
            continue
    return out


def added_from(repo: Path, origin: Path) -> Path | None:
    """The ``data/sources/*.dvc`` that imports ``origin``, if one does."""
    for f, data in _dvc_files(repo).items():
        deps = data.get("deps") or []
        if deps and os.path.normpath(str(deps[0].get("path", ""))) == str(origin):
            return f
    return None


def _dvc(repo: Path, *args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise AddSourceError(f"dvc {' '.join(args)} failed:\n{p.stderr.strip() or p.stdout}")


def _md5(dvc_file: Path) -> str:
    return str((yaml.safe_load(dvc_file.read_text())["outs"][0]).get("md5", "?"))


def rewrite_captions(table: Path, origin: Path, name: str, out: Path) -> int:
    """Write ``table`` to ``out`` (in ``data/sources``) with each row's ``path`` made
    relative to ``out``'s folder, ``NAME/...``; returns the rows. ConfigError naming the
    table and a row whose file is not inside ``origin``."""
    rows = []
    for n, (key, row) in enumerate(read_caption_table(table).items(), 1):
        rel = os.path.relpath(key, origin)
        if rel.startswith(".."):
            raise ConfigError(f"--captions {table}: row {n} names {row['path']}, which is "
                              f"not inside {origin}")
        rows.append({**row, "path": f"{name}/{Path(rel).as_posix()}"})
    if table.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    out.write_text(text, encoding="utf-8")
    return len(rows)


def edit_params(params: Path, entry: dict[str, str]) -> tuple[str, int]:
    """The text of ``params`` with ``entry`` appended to ``ingest.sources``, comments and
    layout kept (ruamel round trip), and the entry's index; ConfigError naming the key when
    the result would not load."""
    from ruamel.yaml.comments import CommentedMap

    from cantus.overlay import edit_text

    want = read_params(params)
    sources = (want.get("ingest") or {}).get("sources")
    if not isinstance(sources, list):
        raise ConfigError(f"{params}: no list 'ingest.sources' to add the source to")
    want["ingest"]["sources"] = [*sources, entry]
    from_dict(IngestConfig, want["ingest"], prefix="ingest")  # names a bad key

    def append(doc) -> None:
        seq = doc["ingest"]["sources"]
        item = CommentedMap(entry)
        if len(seq) and getattr(seq[0], "fa", None) is not None and seq[0].fa.flow_style():
            item.fa.set_flow_style()  # as the entries already there are written
        seq.append(item)

    return edit_text(params, append, want), len(sources)


def add(path: str, kind: str | None = None, name: str | None = None,
        captions: str | None = None, repo: str | Path = ".", params: str = "params.yaml"
        ) -> dict[str, Any]:
    """Import ``path`` as ``data/sources/NAME`` and list it in ``ingest.sources``.

    Returns ``{"name", "kind", "origin", "target", "dvc_file", "md5", "entry", "index",
    "captions"}``. Everything is checked before DVC runs, and params.yaml is written
    only after the import succeeded.
    """
    repo = Path(repo).resolve()
    if not (repo / ".dvc").is_dir():
        raise ConfigError(f"{repo}: not a DVC repository (no .dvc folder; run `dvc init`)")
    kind = kind or infer_kind(path)
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"--kind {kind}: must be one of {', '.join(SOURCE_KINDS)}")
    origin = _origin(path, kind)
    if origin == repo or repo in origin.parents:
        raise ConfigError(f"{path} is inside the repository: list it in ingest.sources as "
                          "it is (track a folder with `dvc add`)")
    name = name if name is not None else default_name(origin)
    if not _NAME.match(name or ""):
        raise ConfigError(f"--name {name!r}: a source name is letters, digits, '.', '_' and "
                          "'-', starting with a letter or digit")
    if captions is not None:
        if kind not in ("folder", "glob"):
            raise ConfigError(f"--captions: a {kind} carries its own captions")
        if not Path(captions).is_file():
            raise FileNotFoundError(f"--captions {captions}: no such file")
        if Path(captions).suffix not in (".csv", ".jsonl"):
            raise ConfigError(f"--captions {captions}: must be a .csv or .jsonl table")
    if (before := added_from(repo, origin)) is not None:
        raise ConfigError(f"{origin} was added already, as {before.relative_to(repo)}; bring "
                          f"in its changes with `cantus add-source --update {before.stem}`")
    suffix = "" if origin.is_dir() else origin.suffix
    target = SOURCES / f"{name}{suffix}"
    table = (SOURCES / f"{name}.captions{Path(captions).suffix}") if captions else None
    for p in (target, Path(f"{target}.dvc"), table):
        if p is not None and (repo / p).exists():
            raise ConfigError(f"name clash: {p} exists already; choose another --name")
    listed = (read_params(repo / params).get("ingest") or {}).get("sources") or []
    if any(isinstance(s, dict) and (str(s.get("path")) + "/").startswith(f"{target}/")
           for s in listed):
        raise ConfigError(f"name clash: ingest.sources lists {target} already; choose "
                          "another --name")
    entry_path = str(target) if kind != "glob" else str(target / glob_base(path)[1])
    entry = {"kind": kind, "path": entry_path, "captions": str(table or "")}
    text, index = edit_params(repo / params, entry)  # a params file that would not load stops
    (repo / SOURCES).mkdir(parents=True, exist_ok=True)
    if table is not None:  # before the import: a bad table stops everything
        rewrite_captions(Path(captions), origin, name, repo / table)
    try:
        _dvc(repo, "import-url", str(origin), str(target))
    except BaseException:
        if table is not None:
            (repo / table).unlink(missing_ok=True)
        raise
    (repo / params).write_text(text)
    dvc_file = Path(f"{target}.dvc")
    return {"name": name, "kind": kind, "origin": str(origin), "target": str(target),
            "dvc_file": str(dvc_file), "md5": _md5(repo / dvc_file), "entry": entry,
            "index": index, "captions": None if table is None else str(table)}


def update(what: str, repo: str | Path = ".") -> dict[str, Any]:
    """``dvc update`` the source named ``what`` (its name, or the path it was added from);
    returns ``{"dvc_file", "origin", "before", "after"}`` (the md5 of its content)."""
    repo = Path(repo).resolve()
    # a folder's is NAME.dvc, a file's NAME.txt.dvc / NAME.csv.dvc
    named = [f for f in _dvc_files(repo) if f.name == f"{what}.dvc" or (
        f.name.startswith(f"{what}.") and f.name.count(".") == what.count(".") + 2)]
    found = named[0] if len(named) == 1 else added_from(repo, Path(what).expanduser().resolve())
    if found is None:
        known = ", ".join(f.stem for f in _dvc_files(repo)) or "none"
        raise FileNotFoundError(f"--update {what}: no source of that name or origin in "
                                f"{SOURCES} (known: {known})")
    before = _md5(found)
    _dvc(repo, "update", str(found.relative_to(repo)))
    deps = yaml.safe_load(found.read_text()).get("deps") or [{}]
    return {"dvc_file": str(found.relative_to(repo)), "origin": deps[0].get("path"),
            "before": before, "after": _md5(found)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cantus add-source", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="folder, glob (quoted), URL list or MusicCaps CSV; with "
                                "--update: a source's name or the path it was added from")
    p.add_argument("--kind", choices=SOURCE_KINDS, help="default: from what PATH is")
    p.add_argument("--name", help="data/sources/NAME (default: PATH's name)")
    p.add_argument("--captions", metavar="CSV_OR_JSONL", help="captions table keyed by path "
                                                              "(relative to the table)")
    p.add_argument("--params", default="params.yaml", help="params file to list it in")
    p.add_argument("--update", action="store_true",
                   help="bring in the changes of a source added before (dvc update)")
    return p


def _next_steps(got: dict[str, Any]) -> str:
    files = [got["dvc_file"], str(SOURCES / ".gitignore"), "params.yaml"]
    files += [got["captions"]] if got["captions"] else []
    entry = ", ".join(f"{k}: {v!r}" if v == "" else f"{k}: {v}" for k, v in got["entry"].items())
    return "\n".join([
        f"added {got['target']} ({got['kind']}, md5 {got['md5']}) from {got['origin']}",
        f"params.yaml: ingest.sources[{got['index']}] = {{{entry}}}",
        "next:",
        f"  git add {' '.join(files)}",
        "  dvc repro                  # ingest takes the new source in, then every later stage",
        f"  git commit -m 'source {got['name']}' && dvc push",
        f"after files in {got['origin']} change:",
        f"  cantus add-source --update {got['name']} && dvc repro"])


def main(argv: list[str] | None = None) -> int:
    """``cantus add-source``: 0 done, 2 a bad path, name or params (one line on stderr
    naming it), 1 DVC failed."""
    args = _parser().parse_args(argv)
    try:
        if args.update:
            got = update(args.path)
            change = ("unchanged" if got["before"] == got["after"]
                      else f"md5 {got['before']} -> {got['after']}")
            print(f"updated {got['dvc_file']} from {got['origin']}: {change}")
            if got["before"] != got["after"]:
                print(f"next: dvc repro, then git add {got['dvc_file']} && git commit")
        else:
            print(_next_steps(add(os.path.expanduser(args.path), args.kind, args.name,
                                  args.captions, ".", args.params)))
    except (ConfigError, FileNotFoundError) as e:
        print(f"cantus add-source: {e}", file=sys.stderr)
        return 2
    except AddSourceError as e:
        print(f"cantus add-source: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
