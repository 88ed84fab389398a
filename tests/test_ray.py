"""One real run on a local Ray instance: same bytes as in-process, loopback only."""

import dataclasses
import subprocess

import pytest

from cantus.ingest import run as ingest
from cantus.parallel import init_ray
from conftest import melody, read_dir_bytes, write


@pytest.mark.ray
def test_ray_run_matches_local_run_and_listens_on_loopback(tmp_path, cfg):
    import ray

    src = tmp_path / "src"
    for i in range(6):
        write(src / f"t{i}.flac", melody(400 + i, 15))
    write(src / "copy.flac", melody(400, 15))
    (src / "junk.wav").write_bytes(b"junk" * 99)
    local = ingest.run(cfg, ingest.Inputs(local=(str(src),)), tmp_path / "local", tmp_path / "c1")
    init_ray(num_cpus=2)
    try:
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
        ray_cfg = dataclasses.replace(cfg, executor="ray", num_workers=2)
        remote = ingest.run(ray_cfg, ingest.Inputs(local=(str(src),)), tmp_path / "ray",
                            tmp_path / "c2")
    finally:
        ray.shutdown()
    assert read_dir_bytes(tmp_path / "ray") == read_dir_bytes(tmp_path / "local")
    assert remote["chunks"] == local["chunks"] > 0
    ray_lines = [ln for ln in listening.splitlines()
                 if any(p in ln for p in ("raylet", "gcs_server", "ray::", "dashboard"))]
    assert ray_lines, listening
    for ln in ray_lines:
        addr = ln.split()[3]
        assert addr.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")), ln
