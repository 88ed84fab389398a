"""Killed with SIGKILL, a rerun finishes the job and matches an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time

import yaml

from cantus.ingest import run as ingest
from conftest import ROOT, melody, read_dir_bytes, write


def _params(tmp_path, cfg):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(executor="local", num_workers=1, chunk_seconds=cfg.chunk_seconds,
                            hop_seconds=cfg.hop_seconds, min_chunk_seconds=cfg.min_chunk_seconds,
                            shard_max_samples=cfg.shard_max_samples)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _cmd(params, src, out, cache):
    return [sys.executable, "-m", "cantus.ingest.run", "--params", str(params), "--source",
            str(src), "--out", str(out), "--cache", str(cache)]


def test_sigkill_then_rerun_is_byte_identical(tmp_path, cfg):
    src = tmp_path / "src"
    for i in range(14):
        write(src / f"piece {i:02d}.flac", melody(200 + i, 22))
    params = _params(tmp_path, cfg)
    ref = subprocess.run(_cmd(params, src, tmp_path / "ref", tmp_path / "c_ref"),
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    staging = tmp_path / "cache" / "ingest"
    proc = subprocess.Popen(_cmd(params, src, tmp_path / "out", tmp_path / "cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if staging.exists() and len(list(staging.rglob("*.tar"))) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    done = len(list(staging.rglob("*.tar")))
    again = subprocess.run(_cmd(params, src, tmp_path / "out", tmp_path / "cache"),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    cached = int(re.search(r"(\d+) inputs from the cache", again.stdout).group(1))
    assert cached == done >= 4  # finished inputs were not redone
    assert read_dir_bytes(tmp_path / "out") == read_dir_bytes(tmp_path / "ref")


def test_finished_shards_are_kept_on_rerun(tmp_path, cfg):
    src = tmp_path / "src"
    for i in range(5):
        write(src / f"t{i}.flac", melody(300 + i, 21))
    first = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")
    ref = read_dir_bytes(tmp_path / "o")
    tars = sorted(n for n in ref if n.endswith(".tar"))
    assert len(tars) >= 3
    os.remove(tmp_path / "o" / tars[1])  # as if killed while writing shards
    os.remove(tmp_path / "o" / "manifest.parquet")
    (tmp_path / "o" / f"{tars[2]}.tmp-deadbeef").write_bytes(b"half a shard")
    again = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "o", tmp_path / "c")
    assert again["shards_written"] == 1 and again["shards_skipped"] == len(tars) - 1
    assert again["inputs_cached"] == first["inputs_processed"] == 5
    assert read_dir_bytes(tmp_path / "o") == ref
