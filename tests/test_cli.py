"""The ``cantus`` command: every pipeline step is a subcommand, run here as a subprocess.

Exit status: 0 done, 2 a bad input or config (one line on stderr naming it, no
traceback), 1 a failure. The exit-0 cases run on tiny inputs made in the test;
the bad-input cases (a missing input, a typo'd params key) run for every
subcommand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from cantus.cli import COMMANDS
from conftest import ROOT

# subcommand -> (its arguments, with {x} for a path under the test folder; the params
# section a typo goes into, None for a command without params)
CASES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "demo": ("--out {out}", ("demo",)),
    "ingest": ("--source {missing-src} --out {out} --cache {cache}", ("ingest",)),
    "codec train": ("--audio {missing-audio} --out {out} --checkpoints {ck}",
                    ("codec", "train")),
    "codec eval": ("--audio {missing-audio} --model {missing-codec} --out {out}.json",
                   ("codec", "eval")),
    "semantic pretrain": ("--audio {missing-audio} --out {out} --checkpoints {ck}",
                          ("semantic", "pretrain")),
    "semantic kmeans": ("--model {missing-w2v} --audio {missing-audio} --out {out}",
                        ("semantic", "kmeans")),
    "semantic eval": ("--model {missing-w2v} --codebook {missing-km} --audio {missing-audio} "
                      "--out {out}.json", ("semantic", "eval")),
    "mulan train": ("--audio {missing-audio} --out {out} --checkpoints {ck}",
                    ("mulan", "train")),
    "mulan rvq": ("--model {missing-mulan} --audio {missing-audio} --out {out}",
                  ("mulan", "rvq")),
    "mulan eval": ("--model {missing-mulan} --rvq {missing-rvq} --audio {missing-audio} "
                   "--out {out}.json", ("mulan", "eval")),
    "tokenize acoustic": ("--audio {missing-audio} --codec {missing-codec} --out {out}",
                          ("tokenize",)),
    "tokenize semantic": ("--audio {missing-audio} --semantic {missing-w2v} "
                          "--semantic-kmeans {missing-km} --out {out}", ("tokenize",)),
    "tokenize mulan": ("--audio {missing-audio} --mulan {missing-mulan} "
                       "--mulan-rvq {missing-rvq} --out {out}", ("tokenize",)),
    "pack": ("--audio {missing-audio} --acoustic {missing-a} --semantic {missing-s} "
             "--mulan {missing-m} --out {out}", None),
    "train": ("--stage coarse --tokens {missing-tokens} --out {out} --checkpoints {ck}",
              ("lm", "coarse", "train")),
    "generate": ("harp --out {out}.wav --models {missing-models} --device cpu",
                 ("generate",)),
    "generate-eval": ("--models {missing-models} --audio {missing-audio} --out {out}",
                      ("evaluate",)),
    "evaluate": ("--generated {missing-gen} --audio {missing-audio} --models {missing-models} "
                 "--metrics {missing-metrics} --out {out}", ("evaluate",)),
    "dataset": ("show --repo {missing-repo}", None),
    "add-source": ("{missing-src}", None),
}


def _env() -> dict[str, str]:
    """This interpreter's environment, one torch thread (the CPU is shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cantus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``cantus ARGS`` as a subprocess of this interpreter (the installed entry point's code)."""
    return subprocess.run([sys.executable, "-m", "cantus.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=_env())


def argv(command: str, tmp: Path, params: Path | None) -> list[str]:
    """The command's words and arguments, its paths under ``tmp``."""
    words = command.split()
    for a in CASES[command][0].split():
        if a.startswith("{"):
            name, _, suffix = a[1:].partition("}")
            a = str(tmp / name) + suffix
        words.append(a)
    return words + (["--params", str(params)] if params and CASES[command][1] else [])


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """The single stderr line of a bad-input exit (2, no traceback), or a failure showing all."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (
        f"exit {p.returncode}, stderr:\n{p.stderr[-3000:]}")
    return lines[0]


def test_help_lists_every_pipeline_step_and_unknown_commands_exit_2():
    ok = cantus("--help")
    assert ok.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in ok.stdout, name
    for name in ("demo", "ingest", "pack", "train", "generate", "generate-eval", "evaluate",
                 "tokenize acoustic", "tokenize semantic", "tokenize mulan", "codec train",
                 "codec eval", "semantic pretrain", "semantic kmeans", "semantic eval",
                 "mulan train", "mulan rvq", "mulan eval"):
        assert name in COMMANDS and name in CASES, name
    assert set(CASES) == set(COMMANDS)
    for bad, says in ((["nope"], "unknown command 'nope'"),
                      (["tokenize"], "missing subcommand (known: acoustic, semantic, mulan)"),
                      (["codec", "tarin"], "unknown 'tarin' subcommand")):
        assert says in one_line_error(cantus(*bad))


def test_every_subcommand_delegates_to_its_module_main():
    import importlib

    from cantus.cli import resolve

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), module
        assert resolve([*name.split(), "--x"]) == (name, ["--x"])
    assert resolve(["generate_eval", "--out", "o"]) == ("generate-eval", ["--out", "o"])
    p = cantus("tokenize", "mulan", "--help")  # the module's own parser answers
    assert p.returncode == 0 and "--mulan-rvq" in p.stdout and "cantus tokenize mulan" in p.stdout


def _run_all(jobs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda a: cantus(*a), jobs))


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_naming_it_for_every_subcommand(tmp_path):
    """A missing input folder, and a typo'd key in the command's params section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump(params))
    jobs, checks = [], []
    for name, (_, where) in CASES.items():
        if "{missing" in CASES[name][0]:
            jobs.append(argv(name, tmp_path / name.replace(" ", "_"), good))
            checks.append((name, "missing", None))
        if where is not None:
            bad = json.loads(json.dumps(params))
            section = bad
            for key in where:
                section = section[key]
            section["stpes"] = 3
            path = tmp_path / f"bad-{name.replace(' ', '_')}.yaml"
            path.write_text(yaml.safe_dump(bad))
            jobs.append(argv(name, tmp_path / f"k-{name.replace(' ', '_')}", path))
            checks.append((name, "key", ".".join((*where, "stpes"))))
    failures = []
    for (name, kind, key), p in zip(checks, _run_all(jobs)):
        try:
            line = one_line_error(p)
            if kind == "missing":
                assert "missing-" in line, line  # names the missing input
            else:
                assert key in line and "configuration error" in line, line
        except AssertionError as e:
            failures.append(f"cantus {name} ({kind}): {e}")
    assert not failures, "\n\n".join(failures)
    for name in CASES:  # no command did any work before refusing
        out = tmp_path / f"k-{name.replace(' ', '_')}" / "out"
        assert not out.exists() and not out.with_suffix(".json").exists(), name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Seeded melodies with captions, their ingest output, tiny untrained models of every
    kind (as tests/test_generate.py makes them) and configs/tiny.yaml applied."""
    import dataclasses

    from cantus.tokenize.codec.model import CodecConfig
    from cantus.train.stage import save_stage
    from conftest import audio_shards, tiny_tokenizer_models
    from test_generate import CAPTIONS, K, tiny_lm, tokens_cfg

    tmp = tmp_path_factory.mktemp("cli")
    audio = audio_shards(tmp, 4, 4.0, seed=700, chunk_seconds=2.0, valid_fraction=0.3,
                         min_chunk_seconds=1.0, rate=24000, sidecars=CAPTIONS)
    models = tmp / "models"
    tiny_tokenizer_models(models, audio, dataclasses.replace(CodecConfig.tiny(), n_q=12,
                                                             codebook_size=K))
    for i, stage in enumerate(("semantic", "coarse", "fine")):
        model, lay = tiny_lm(stage, seed=i)
        save_stage(model, lay, tokens_cfg(), models / f"lm_{stage}")
    subprocess.run([sys.executable, "-m", "cantus.overlay", "apply", str(ROOT / "configs" /
                    "tiny.yaml"), "--params", str(ROOT / "params.yaml"), "--out",
                    str(tmp / "tiny.yaml")], check=True, capture_output=True)
    return {"tmp": tmp, "src": tmp / "src", "audio": audio, "models": models,
            "params": tmp / "tiny.yaml"}


@pytest.mark.slow
def test_generate_continues_a_mono_or_stereo_audio_prompt_from_the_command_line(tiny):
    """decode gives channels-first audio, float32[C, N]: the command downmixes it."""
    tmp, rate = tiny["tmp"], 48000
    t = np.arange(int(0.4 * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    sf.write(str(tmp / "reel.wav"), tone, rate)                                  # (1, N)
    sf.write(str(tmp / "duo.flac"), np.stack([tone, 0.5 * tone], 1), rate)      # (2, N)
    for name, text in (("reel.wav", "solo harp"), ("duo.flac", "")):
        out = tmp / f"more-{name}.wav"
        p = cantus("generate", *([text] if text else []), "--continue", str(tmp / name),
                   "--seconds", "0.4", "--out", str(out), "--models", str(tiny["models"]),
                   "--params", str(ROOT / "params.yaml"), "--device", "cpu")
        assert p.returncode == 0, p.stderr[-3000:]
        x, got = sf.read(str(out))
        assert got == 24000 and x.shape == (int(0.8 * 24000),), (name, x.shape)  # 0.4 + 0.4 s
    line = one_line_error(cantus("generate", "harp", "--continue", str(tmp / "nowhere.wav"),
                                 "--out", str(tmp / "x.wav"), "--models", str(tiny["models"])))
    assert "--continue" in line and "nowhere.wav: no such file" in line


@pytest.mark.slow
def test_ingest_tokenize_and_codec_eval_exit_0_on_tiny_inputs(tiny):
    tmp, params = tiny["tmp"], str(tiny["params"])
    p = cantus("ingest", "--params", params, "--source", str(tiny["src"]), "--out",
               str(tmp / "audio2"), "--cache", str(tmp / "cache2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 inputs" in p.stdout and list((tmp / "audio2").glob("train-*.tar"))
    p = cantus("tokenize", "acoustic", "--params", params, "--audio", str(tmp / "audio2"),
               "--codec", str(tiny["models"] / "codec"), "--out", str(tmp / "acoustic"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(0 already done)" in p.stdout
    assert json.loads((tmp / "acoustic" / "manifest.json").read_text())["field"] == "acoustic"
    p = cantus("codec", "eval", "--params", params, "--audio", str(tmp / "audio2"), "--model",
               str(tiny["models"] / "codec"), "--out", str(tmp / "codec.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "usage" in json.loads((tmp / "codec.json").read_text())
    assert "beats Opus on mel distance" in p.stdout
