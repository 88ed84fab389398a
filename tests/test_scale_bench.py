"""bench/scale.py: the stage commands it derives from dvc.yaml, and its target ratios.

The bench runs every data stage on corpora in a work folder; a path left
pointing into the checkout would make it read the repo's data or overwrite a
DVC output, so each derived command is checked against the real dvc.yaml.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))  # as when run as a script: its sibling procs.py
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scale():
    return _bench()


@pytest.fixture(scope="module")
def dvc_stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", ["demo_corpus", "ingest", "tokenize_acoustic",
                                  "tokenize_semantic", "tokenize_mulan", "tokenize_pack",
                                  "semantic_kmeans", "mulan_rvq"])
def test_stage_commands_stay_in_the_work_folder(scale, dvc_stages, name, tmp_path):
    assert name in scale.STAGES
    stage = dvc_stages[name]
    params = tmp_path / "params.yaml"
    cmd = scale.stage_command(stage, tmp_path, params)
    assert cmd[0] == sys.executable and cmd[1:3] == stage["cmd"].split()[1:3]  # -m module
    outs = {o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])}
    for tok in cmd[3:]:
        assert not tok.startswith(("data/", "models/", "metrics/", "checkpoints/")), tok
        assert tok != "params.yaml"
        p = Path(tok)
        if p.is_absolute() and tok != sys.executable:
            inside = p.is_relative_to(tmp_path)
            trained = p.is_relative_to(ROOT / "models")
            assert inside or trained, tok
            if trained:  # only models the stage reads; what it writes goes to the work folder
                assert f"models/{p.relative_to(ROOT / 'models')}" not in outs, tok
    if "params.yaml" in stage["cmd"].split():
        assert str(params) in cmd
    for out in outs:
        if out.startswith("data/") or out.startswith("models/"):
            assert str(tmp_path / out.split("/", 1)[1]) in cmd


def test_fits_write_their_codebooks_in_the_work_folder(scale, dvc_stages, tmp_path):
    cmd = scale.stage_command(dvc_stages["semantic_kmeans"], tmp_path, tmp_path / "p.yaml")
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "semantic_kmeans")
    assert cmd[cmd.index("--model") + 1] == str(ROOT / "models" / "semantic")
    cmd = scale.stage_command(dvc_stages["tokenize_semantic"], tmp_path, tmp_path / "p.yaml")
    assert cmd[cmd.index("--semantic-kmeans") + 1] == str(ROOT / "models" / "semantic_kmeans")


def test_params_overlay_sets_the_corpus_size_the_fit_cap_and_source_only(scale, tmp_path):
    params = scale.write_params(tmp_path, 7, 1234)
    got, base = (yaml.safe_load(p.read_text()) for p in (params, ROOT / "params.yaml"))
    assert got["demo"]["num_pieces"] == 7 and got["semantic"]["kmeans"]["max_frames"] == 1234
    got["demo"]["num_pieces"] = base["demo"]["num_pieces"]
    got["semantic"]["kmeans"]["max_frames"] = base["semantic"]["kmeans"]["max_frames"]
    if "sources" in base["ingest"]:  # ingest reads the work folder's corpus, not data/demo
        assert [s["path"] for s in got["ingest"]["sources"]] == [str(tmp_path / "demo")]
        got["ingest"]["sources"] = base["ingest"]["sources"]
    assert got == base


def _record(seconds, driver, workers):
    return {"stages": {"s1": {"s": seconds, "driver_rss_mib": driver, "workers_rss_mib": workers}}}


def test_ratios_against_the_targets(scale):
    small = _record(10.0, 100.0, 200.0)
    ok = scale.ratios(small, _record(150.0, 120.0, 250.0), 16)[0]
    assert ok["time"] == pytest.approx(150 / 160) and ok["time_ok"] and ok["rss_ok"]
    slow = scale.ratios(small, _record(200.0, 100.0, 200.0), 16)[0]
    assert slow["time"] == pytest.approx(1.25) and not slow["time_ok"]
    fat = scale.ratios(small, _record(100.0, 100.0, 270.0), 16)[0]
    assert fat["rss_ok"] is False and fat["workers_rss"] == pytest.approx(1.35)
    alone = scale.ratios(_record(10.0, 100.0, 0.0), _record(10.0, 140.0, 0.0), 16)[0]
    assert "workers_rss" not in alone and not alone["rss_ok"]
