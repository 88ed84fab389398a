"""Config overlays: small YAML files of overrides merged into ``params.yaml``.

An overlay (``configs/tiny.yaml``, ``configs/paper.yaml``) holds only the keys
it changes, nested by section like params.yaml. ``apply`` deep-merges it into
the params file: every overridden key must already exist there (a typo is an
error naming the dotted key), mappings merge key by key, anything else
(numbers, strings, lists) is replaced whole. The merged file is validated by
loading every section into its dataclass, plus the cross-section size checks
of ``check_consistency``, before it is written. Comments, key order and flow
style of params.yaml are kept (ruamel.yaml round-trip, installed with dvc).

    python -m cantus.overlay apply configs/paper.yaml            # rewrites params.yaml
    python -m cantus.overlay apply configs/tiny.yaml --out /tmp/p.yaml
    python -m cantus.overlay check params.yaml                   # validate only

``git checkout params.yaml`` undoes an apply.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import math
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from cantus.config import ConfigError, from_dict, read_params

# Section -> "module:dataclass" that loads it. Imported lazily so cantus/ keeps
# no import-time dependency on the stage folders. A stage that adds a params
# section adds its loader here so overlays are validated against it.
SECTIONS: dict[str, str] = {
    "demo": "cantus.ingest.params:DemoConfig",
    "ingest": "cantus.ingest.params:IngestConfig",
    "mulan": "cantus.tokenize.mulan.params:MulanConfig",
    "semantic": "cantus.tokenize.semantic.params:SemanticConfig",
    "codec": "cantus.tokenize.codec.params:CodecSection",
    "lm": "cantus.train.stage:LMConfig",
    "tokenize": "cantus.tokenize.run:TokenizeConfig",
    "generate": "cantus.generate.run:GenerateConfig",
    "evaluate": "cantus.evaluate.params:EvaluateConfig",
}


def merge(base: dict[str, Any], overlay: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``base`` with ``overlay`` deep-merged in (a new dict; neither input changes).

    Raises:
        ConfigError: an overlay key absent from ``base`` (named by its dotted
            path), or a scalar given where ``base`` has a mapping.
    """
    out = copy.deepcopy(base)
    _merge_into(out, overlay, prefix, lambda m, k, v: m.__setitem__(k, copy.deepcopy(v)))
    return out


def _merge_into(base: Any, overlay: Any, prefix: str,
                assign: Callable[[Any, str, Any], None]) -> None:
    if not isinstance(overlay, dict):
        raise ConfigError(f"overlay '{prefix or '<top>'}' must be a mapping, "
                          f"got {type(overlay).__name__}")
    for key, value in overlay.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in base:
            known = ", ".join(str(k) for k in base)
            raise ConfigError(f"unknown key '{dotted}' (not in params; known here: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section in params; the overlay must give "
                                  f"a mapping of its keys, got {value!r}")
            _merge_into(base[key], value, dotted, assign)
        else:
            assign(base, key, value)


def changed_keys(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves an overlay sets."""
    keys = []
    for k, v in overlay.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        keys += changed_keys(v, dotted) if isinstance(v, dict) and v else [dotted]
    return keys


def load_sections(params: dict[str, Any]) -> dict[str, Any]:
    """Every section with a registered loader, built into its dataclass."""
    out = {}
    for section, target in SECTIONS.items():
        if section not in params:
            raise ConfigError(f"missing section '{section}'")
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        out[section] = from_dict(cls, params[section], prefix=section)
    return out


def check_consistency(params: dict[str, Any]) -> None:
    """Sizes that several sections must agree on (the token shards join them).

    Each field's codebook size fits a uint16 token (the LM layout gives each field
    and level a block of that field's K ids, read from the token manifest, so the
    three may differ); RVQ levels; token frame rates; and LM crops that fit in an
    ingest chunk.
    """
    lm, codec = params["lm"]["tokens"], params["codec"]["model"]
    for key, value in (("codec.model.codebook_size", codec["codebook_size"]),
                       ("semantic.kmeans.clusters", params["semantic"]["kmeans"]["clusters"]),
                       ("mulan.rvq.codebook_size", params["mulan"]["rvq"]["codebook_size"])):
        if not 2 <= value <= 65536:
            raise ConfigError(f"'{key}' is {value}: a codebook holds 2 to 65536 codes "
                              "(tokens are uint16)")
    for key, value, lm_key in (("codec.model.n_q", codec["n_q"], "acoustic_levels"),
                               ("mulan.rvq.levels", params["mulan"]["rvq"]["levels"],
                                "mulan_levels")):
        if value != lm[lm_key]:
            raise ConfigError(f"'{key}' is {value} but lm.tokens.{lm_key} is {lm[lm_key]}")
    expect = lm.get("expect", {})
    rate = codec["sample_rate"] / math.prod(codec["strides"])
    want = expect.get("acoustic", {}).get("frame_rate")
    if want is not None and want != rate:
        raise ConfigError(f"'lm.tokens.expect.acoustic.frame_rate' is {want} but the codec "
                          f"runs at {rate} frames/s")
    want = expect.get("semantic", {}).get("frame_rate")
    have = params["semantic"]["kmeans"]["token_rate"]
    if want is not None and want != have:
        raise ConfigError(f"'lm.tokens.expect.semantic.frame_rate' is {want} but "
                          f"semantic.kmeans.token_rate is {have}")
    chunk = params["ingest"]["chunk_seconds"]
    for stage in ("semantic", "coarse", "fine"):
        crop = params["lm"][stage]["crop_seconds"]
        if crop > chunk:
            raise ConfigError(f"'lm.{stage}.crop_seconds' ({crop}) is longer than "
                              f"ingest.chunk_seconds ({chunk})")


def validate(params: dict[str, Any]) -> None:
    """Raise ConfigError unless every section loads and the sizes agree."""
    load_sections(params)
    check_consistency(params)


def _ruamel():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments, order and flow style
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(float, _represent_float)
    return y


def _represent_float(representer, value: float):
    # ruamel writes 2e-05, which PyYAML (YAML 1.1, what the stages read) takes for a string
    text = repr(value)
    if math.isfinite(value) and "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    elif not math.isfinite(value):
        text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _assign_keeping_style(mapping: Any, key: str, value: Any) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    old = mapping[key]
    if _same(old, value):
        return  # unchanged: keep the node as written
    if isinstance(value, list):
        seq = CommentedSeq(value)
        if isinstance(old, CommentedSeq) and old.fa.flow_style():
            seq.fa.set_flow_style()
        value = seq
    elif isinstance(value, dict):
        value = CommentedMap(value)
    mapping[key] = value


def _same(old: Any, value: Any) -> bool:
    """Whether a loaded node already holds ``value`` (ruamel's types subclass the plain ones)."""
    if isinstance(old, bool) or isinstance(value, bool):
        return old is value or (isinstance(old, bool) and isinstance(value, bool)
                                and bool(old) == value)
    if isinstance(old, (int, float)) and isinstance(value, (int, float)):
        return isinstance(old, float) == isinstance(value, float) and old == value
    if isinstance(old, str) and isinstance(value, str):
        return str(old) == value
    if isinstance(old, list) and isinstance(value, list):
        return len(old) == len(value) and all(map(_same, old, value))
    return False


def apply(overlay_path: str | Path, params_path: str | Path = "params.yaml",
          out: str | Path | None = None) -> list[str]:
    """Merge an overlay file into a params file and write it (to ``out`` or in place).

    Nothing is written unless the merged params are valid. Returns the dotted
    keys the overlay sets.
    """
    overlay = read_params(overlay_path)
    merged = merge(read_params(params_path), overlay)  # names any unknown key
    try:
        validate(merged)
    except ConfigError as e:
        raise ConfigError(f"{overlay_path}: the merged params are invalid: {e}") from None
    text = edit_text(params_path, lambda doc: _merge_into(doc, overlay, "",
                                                          _assign_keeping_style), merged)
    Path(out or params_path).write_text(text)
    return changed_keys(overlay)


def edit_text(params_path: str | Path, edit: Callable[[Any], None],
              expected: dict[str, Any]) -> str:
    """The text of a params file after ``edit`` changes its ruamel document in place
    (comments, order and flow style kept); RuntimeError unless it loads as ``expected``."""
    y = _ruamel()
    doc = y.load(Path(params_path).read_text())
    edit(doc)
    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    if yaml.safe_load(text) != expected:  # the round trip must give what was asked for
        raise RuntimeError(f"{params_path}: the ruamel round trip does not give the params "
                           "asked for; not written")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cantus.overlay", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="merge an overlay into params.yaml")
    a.add_argument("overlay")
    a.add_argument("--params", default="params.yaml")
    a.add_argument("--out", default=None, help="write here instead of over --params")
    c = sub.add_parser("check", help="validate a params file (every section, sizes)")
    c.add_argument("params", nargs="?", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        if args.command == "apply":
            keys = apply(args.overlay, args.params, args.out)
            print(f"{args.out or args.params}: {len(keys)} keys from {args.overlay}")
        else:
            validate(read_params(args.params))
            print(f"{args.params}: valid")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
