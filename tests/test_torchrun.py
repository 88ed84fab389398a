"""The LM trainer under a real ``torchrun`` with 2 CPU processes (gloo)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cantus.train.stage import load_stage
from cantus.train.synthetic import write_synthetic_tokens
from cantus.training import read_config

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_two_process_torchrun_trains_and_rank0_writes_once(tmp_path):
    tokens = write_synthetic_tokens(tmp_path / "tokens", chunks=12, seconds=2.0, valid=2,
                                    shards_train=2)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["lm"]["coarse"].update(
        crop_seconds=1.0, model={"layers": 1, "heads": 2, "dim": 32, "ffn": 64, "dropout": 0.0})
    params["lm"]["coarse"]["train"].update(
        steps=4, warmup_steps=1, batch_size=2, checkpoint_every=2, valid_every=2,
        valid_samples=2, unigram_samples=4, log_every=1, shuffle_buffer=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "cantus.train.run", "--stage", "coarse", "--params", "params.yaml",
           "--tokens", str(tokens), "--out", "out", "--checkpoints", "ckpt", "--live", "live"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    # only rank 0 prints the summary, and it names the weights it wrote
    assert p.stdout.count('"stage": "coarse"') == 1
    summary = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])
    assert summary["steps"] == 4
    model, layout = load_stage(tmp_path / "out")
    assert layout.spec.name == "coarse" and model.cfg.layers == 1
    assert read_config(tmp_path / "out")["summary"]["steps"] == 4
    assert sorted(f.name for f in (tmp_path / "ckpt").iterdir()) == [
        "step-00000002.pt", "step-00000004.pt"]
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == summary["sha256"]
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["val_ppl"] < layout.sizes["acoustic"]  # below uniform
    assert Path(tmp_path / "live" / "plots" / "metrics" / "train_loss.tsv").is_file()
