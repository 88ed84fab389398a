"""The package layout (stage folders without __init__.py, no shadowed stdlib), and the cantus
command."""

import subprocess
from pathlib import Path
import sys

from conftest import ROOT


def test_stdlib_tokenize_not_shadowed_from_repo_root():
    out = subprocess.run([sys.executable, "-c", "import tokenize; print(tokenize.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert "/tokenize/" not in out and str(ROOT) not in out, out
    assert out.endswith("tokenize.py")


def test_stage_folders_have_no_init():
    for d in ("ingest", "tokenize", "tokenize/codec", "tokenize/semantic", "tokenize/mulan",
              "train", "generate", "evaluate"):
        assert (ROOT / d).is_dir(), d
        assert not (ROOT / d / "__init__.py").exists(), f"{d}/__init__.py must not exist"


def test_stage_modules_import_as_cantus_subpackages():
    code = "import cantus.ingest.run as r, cantus.config as c; print(r.__file__); print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                         text=True, check=True).stdout.split()
    # from outside the repo: this checkout's files (editable install), or a wheel's copies
    # of exactly them
    for got, want in zip(out, (ROOT / "ingest" / "run.py", ROOT / "cantus" / "config.py")):
        assert Path(got).read_bytes() == want.read_bytes(), (got, want)
        assert Path(got) == want or "site-packages" in got, got


def test_cantus_command_lists_and_rejects():
    ok = subprocess.run([sys.executable, "-m", "cantus.cli", "--help"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "ingest" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cantus.cli", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
