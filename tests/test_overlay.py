"""Config overlays (cantus/overlay.py, configs/*.yaml): merge, apply, validation."""

import shutil

import pytest
import yaml

from cantus.config import ConfigError, read_params
from cantus.overlay import SECTIONS, apply, changed_keys, main, merge, validate

from conftest import ROOT

OVERLAYS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture
def params(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    return p


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_keeps_siblings_and_replaces_leaves_and_lists():
    base = {"a": {"x": 1, "y": [1, 2, 3], "z": {"p": 1, "q": 2}}, "b": 2}
    out = merge(base, {"a": {"y": [9], "z": {"q": 5}}})
    assert out == {"a": {"x": 1, "y": [9], "z": {"p": 1, "q": 5}}, "b": 2}
    assert base["a"]["y"] == [1, 2, 3] and base["a"]["z"]["q"] == 2  # inputs untouched
    assert changed_keys({"a": {"y": [9], "z": {"q": 5}}}) == ["a.y", "a.z.q"]


def test_unknown_key_is_named_and_nothing_is_written(params, tmp_path):
    before = params.read_bytes()
    bad = _write(tmp_path / "bad.yaml", {"codec": {"model": {"chanels": 4}}})
    with pytest.raises(ConfigError, match=r"unknown key 'codec\.model\.chanels'"):
        apply(bad, params)
    with pytest.raises(ConfigError, match=r"unknown key 'codecs'"):
        merge(read_params(params), {"codecs": {}})
    assert params.read_bytes() == before


def test_scalar_over_a_section_is_refused():
    with pytest.raises(ConfigError, match=r"'lm\.semantic\.model' is a section"):
        merge(read_params(ROOT / "params.yaml"), {"lm": {"semantic": {"model": 3}}})


def test_sizes_that_must_agree_are_checked(params, tmp_path):
    before = params.read_bytes()
    # a K of its own for the semantic tokens is fine (the LM reads each field's K from the
    # token manifest); one that a uint16 token cannot hold is not
    ok = _write(tmp_path / "k.yaml", {"semantic": {"kmeans": {"clusters": 512}}})
    out = tmp_path / "k-out.yaml"
    apply(ok, params, out)
    assert read_params(out)["semantic"]["kmeans"]["clusters"] == 512
    bad = _write(tmp_path / "k2.yaml", {"semantic": {"kmeans": {"clusters": 70000}}})
    with pytest.raises(ConfigError, match=r"semantic\.kmeans\.clusters' is 70000"):
        apply(bad, params)
    bad = _write(tmp_path / "nq.yaml", {"codec": {"model": {"n_q": 8}}})
    with pytest.raises(ConfigError, match=r"codec\.model\.n_q"):
        apply(bad, params)
    bad = _write(tmp_path / "v.yaml", {"ingest": {"min_chunk_seconds": -1.0}})
    with pytest.raises(ConfigError, match=r"ingest\.min_chunk_seconds"):
        apply(bad, params)
    assert params.read_bytes() == before


def test_params_applied_to_itself_is_byte_identical(params):
    before = params.read_bytes()
    keys = apply(ROOT / "params.yaml", params)
    assert params.read_bytes() == before and "lm.fine.train.compile" in keys


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_applies_keeps_comments_and_round_trips(overlay, params, tmp_path):
    base = read_params(params)
    apply(overlay, params)
    text = params.read_text()
    assert yaml.safe_load(text) == merge(base, read_params(overlay))
    # comments, key order and flow style of params.yaml survive
    original = (ROOT / "params.yaml").read_text()
    comments = [ln.strip() for ln in original.splitlines() if ln.strip().startswith("#")]
    assert comments and all(c in text for c in comments)
    assert [ln.split(":")[0] for ln in text.splitlines() if ln and not ln[0].isspace()] == \
        [ln.split(":")[0] for ln in original.splitlines() if ln and not ln[0].isspace()]
    assert "    model: {layers:" in text
    # applying it again changes nothing
    again = tmp_path / "again.yaml"
    apply(overlay, params, out=again)
    assert again.read_bytes() == params.read_bytes()


def test_the_overlays_pass_validation_of_every_section():
    for overlay in OVERLAYS:
        validate(merge(read_params(ROOT / "params.yaml"), read_params(overlay)))
    paper = merge(read_params(ROOT / "params.yaml"), read_params(ROOT / "configs/paper.yaml"))
    assert [paper["lm"][s]["crop_seconds"] for s in ("semantic", "coarse", "fine")] == [30, 10, 3]
    for s in ("semantic", "coarse", "fine"):
        assert paper["lm"][s]["model"] == {"layers": 24, "heads": 16, "dim": 1024, "ffn": 4096,
                                           "dropout": 0.1, "position": "t5"}
    assert (paper["codec"]["model"]["n_q"], paper["codec"]["model"]["codebook_size"]) == (12, 1024)
    assert (paper["mulan"]["rvq"]["levels"], paper["mulan"]["rvq"]["codebook_size"]) == (12, 1024)
    assert paper["semantic"]["model"]["size"] == "paper"
    assert paper["ingest"]["chunk_seconds"] == 30


def test_every_params_section_has_a_loader():
    missing = sorted(set(read_params(ROOT / "params.yaml")) - set(SECTIONS))
    assert not missing, (f"add the dataclass of section(s) {missing} to cantus.overlay.SECTIONS "
                         "so overlays are validated against them")


def test_cli_names_the_unknown_key(params, tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {"lm": {"semantic": {"crop_secs": 3.0}}})
    assert main(["apply", str(bad), "--params", str(params)]) == 2
    assert "lm.semantic.crop_secs" in capsys.readouterr().err
    out = tmp_path / "tiny.yaml"
    assert main(["apply", str(ROOT / "configs/tiny.yaml"), "--params", str(params),
                 "--out", str(out)]) == 0
    assert main(["check", str(out)]) == 0
    assert read_params(out)["semantic"]["kmeans"]["clusters"] == 16
