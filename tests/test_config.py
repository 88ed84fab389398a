"""params.yaml sections load into frozen dataclasses that name bad keys."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from cantus.config import ConfigError, from_dict, load_section, to_dict
from cantus.ingest.params import DemoConfig, IngestConfig
from conftest import ROOT


def _ingest_dict():
    return yaml.safe_load((ROOT / "params.yaml").read_text())["ingest"]


def test_project_params_load():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_section(ROOT / "params.yaml", "ingest", IngestConfig)
    # every key as written, nested sections too (bad values are tested below)
    assert to_dict(cfg) == raw["ingest"]
    assert to_dict(load_section(ROOT / "params.yaml", "demo", DemoConfig)) == raw["demo"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(chunk_secs=3), "ingest.chunk_secs"),
    (lambda d: d.pop("hop_seconds"), "ingest.hop_seconds"),
    (lambda d: d["download"].update(retry=1), "ingest.download.retry"),
    (lambda d: d.update(sample_rate="24k"), "ingest.sample_rate"),
    (lambda d: d.update(flac_bits=12), "ingest.flac_bits"),
    (lambda d: d.update(executor="spark"), "ingest.executor"),
])
def test_bad_keys_are_named(mutate, key):
    d = _ingest_dict()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        from_dict(IngestConfig, d, prefix="ingest")
    assert f"'{key}'" in str(e.value)


def test_bad_key_fails_the_command_at_start_up(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["loudnes_lufs"] = -14
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "src").mkdir()
    r = subprocess.run([sys.executable, "-m", "cantus.ingest.run", "--params",
                        str(tmp_path / "params.yaml"), "--source", str(tmp_path / "src"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown key 'ingest.loudnes_lufs'" in r.stderr
    assert not (tmp_path / "out").exists()
