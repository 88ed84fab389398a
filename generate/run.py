"""Text (or an audio prompt) in, 24 kHz music out: MusicLM's generation chain.

Goes in: prompts, a duration, and the trained models of ``dvc repro``
(``models/``: mulan + mulan_rvq, lm_semantic, lm_coarse, lm_fine, codec; and
semantic + semantic_kmeans to continue an audio prompt). Comes out: float32
waveforms at the codec's rate, written as WAV by ``main``.

    prompt --MuLan text tower--> embedding --frozen RVQ--> 12 MuLan tokens
      --semantic LM (T=1.0)--> semantic tokens, 25 Hz
      --coarse LM (T=0.95)--> acoustic levels 0-3, 50 Hz
      --fine LM (T=0.4)--> acoustic levels 4-11
      --SoundStream decoder--> waveform

Continuation (AudioLM): the prompt audio is tokenized by the same codec and
w2v-BERT + k-means, every stage keeps those frames and continues them; the
MuLan tokens come from the text if one is given, else from the audio.

    cantus generate "a fast Irish reel on fiddle" --seconds 10 --out reel.wav
    cantus generate "solo harp" --continue intro.wav --seconds 5 --out more.wav

The models are checked against each other: every LM stage records the
tokenizer hashes of the shards it was trained on, and a codec or MuLan that
differs is refused, naming the model. Each stage also records the dataset
version it was trained on (``cantus.dataset_version``); the command prints it,
and the real-time factor of the generation (seconds of audio made per second of
wall time, as ``metrics/generate.json`` has it).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cantus import shards
from cantus.audio import resample
from cantus.config import load_section
from cantus.tokens import ACOUSTIC_HZ, SEMANTIC_HZ
from cantus.training import progress, read_config, resolve_device

from .sample import SampleOptions, sample_frames
from cantus.train.stage import load_stage

log = logging.getLogger(__name__)

MODEL_FOLDERS = {"mulan": "mulan", "mulan_rvq": "mulan_rvq", "semantic_lm": "lm_semantic",
                 "coarse_lm": "lm_coarse", "fine_lm": "lm_fine", "codec": "codec",
                 "semantic": "semantic", "semantic_kmeans": "semantic_kmeans"}
RATIO = ACOUSTIC_HZ // SEMANTIC_HZ


@dataclass(frozen=True)
class StageSampling:
    temperature: float
    top_k: int
    guidance: float   # classifier-free guidance scale (1: off); the fine stage has none

    def options(self) -> SampleOptions:
        return SampleOptions(self.temperature, self.top_k, self.guidance)


@dataclass(frozen=True)
class GenerateConfig:
    """Section ``generate`` of params.yaml."""

    seconds: float          # default duration of a generation
    max_seconds: float      # longer requests are refused (each stage slides its window)
    samples: int            # generations per prompt
    seed: int
    batch_size: int         # rows sampled together
    device: str             # auto, cpu, cuda
    semantic: StageSampling
    coarse: StageSampling
    fine: StageSampling

    def __post_init__(self):
        from cantus.config import ConfigError

        if not self.max_seconds > 0:
            raise ConfigError("'generate.max_seconds' must be positive")
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError("'generate.samples' and 'generate.batch_size' must be at least 1")
        for name in ("semantic", "coarse", "fine"):
            try:
                getattr(self, name).options()
            except ValueError as e:
                raise ConfigError(f"'generate.{name}': {e}") from None


def model_paths(root: str | Path) -> dict[str, str]:
    """The model folders of a ``dvc repro`` output folder (``models/``, or a URL such as
    ``s3://bucket/models``, whose folders ``Generator`` fetches into a local cache)."""
    return {k: shards.join(root, v) for k, v in MODEL_FOLDERS.items()}


def check_request(prompts: list[str] | None, seconds: float, max_seconds: float) -> None:
    if prompts is not None:
        if not prompts:
            raise ValueError("no prompt given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty: give a caption or a list of tags")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)) or seconds <= 0:
        raise ValueError(f"--seconds must be a positive duration, got {seconds}")
    if seconds > max_seconds:
        raise ValueError(f"--seconds {seconds} exceeds generate.max_seconds = {max_seconds}")


def _need(path: str, what: str) -> str:
    """``path`` as a local model folder (a URL's folder fetched, ``cantus.model_cache``);
    FileNotFoundError naming ``what`` when there is none."""
    if shards.is_url(path):
        from cantus.model_cache import local_folder

        try:
            return local_folder(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what} model folder not found: {e}") from None
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} model folder not found: {path} (run `dvc repro` "
                                f"or pass --models)")
    return path


class Generator:
    """The loaded chain. ``generate(prompts, seconds)`` -> float32[N, samples].

    Args:
        paths: model folders as in ``model_paths``.
        device: torch device for every model.
    """

    def __init__(self, paths: dict[str, str], device: str = "cpu"):
        from cantus.tokenize.codec.model import SoundStream
        from cantus.tokenize.mulan.rvq import MulanTokenizer

        self.paths, self.device = dict(paths), device
        self.stages = {s: load_stage(self._local(f"{s}_lm", f"{s} LM"), device)
                       for s in ("semantic", "coarse", "fine")}
        for name, (_, layout) in self.stages.items():
            if layout.dedup:
                raise ValueError(f"{paths[name + '_lm']} was trained on de-duplicated semantic "
                                 "tokens, which carry no timing; generation needs "
                                 f"lm.{name}.dedup_semantic: false")
        self.codec = SoundStream.load(self._local("codec", "codec"), device=device)
        self.mulan = MulanTokenizer.load(self._local("mulan", "MuLan"),
                                         self._local("mulan_rvq", "MuLan RVQ"), device=device)
        self.sample_rate = self.codec.cfg.sample_rate
        self._semantic_tok = None
        self._check_tokenizers()
        # stage -> the dataset version its LM saw (None: trained before stages recorded it)
        self.dataset_versions = {s: read_config(self.paths[f"{s}_lm"]).get("dataset_version")
                                 for s in self.stages}

    def _local(self, name: str, what: str) -> str:
        """The local folder of model ``name`` (fetched once if a URL), kept in ``paths``."""
        self.paths[name] = _need(self.paths[name], what)
        return self.paths[name]

    def _check_tokenizers(self) -> None:
        """Refuse a codec or MuLan other than the ones the LM stages were trained on."""
        from cantus.shards import sha256

        have = {"acoustic": {"checkpoint_hash": sha256(
            Path(self.paths["codec"]) / "model.safetensors")},
            "mulan": {"checkpoint_hash": sha256(
                Path(self.paths["mulan"]) / "model.safetensors"), "rvq_hash": sha256(
                Path(self.paths["mulan_rvq"]) / "codebooks.safetensors")}}
        for stage in self.stages:
            trained = read_config(self.paths[f"{stage}_lm"]).get("tokenizers") or {}
            for field, entries in have.items():
                for key, value in entries.items():
                    want = (trained.get(field) or {}).get(key)
                    if want is not None and want != value:
                        raise ValueError(
                            f"{self.paths[stage + '_lm']} was trained on {field} tokens of "
                            f"{key} {want[:12]}, but the loaded model has {value[:12]}: "
                            "re-tokenize and retrain, or load the matching model")

    @property
    def semantic_tokenizer(self):
        if self._semantic_tok is None:
            from cantus.tokenize.semantic.kmeans import SemanticTokenizer

            self._semantic_tok = SemanticTokenizer(self._local("semantic", "w2v-BERT"),
                                                   self._local("semantic_kmeans", "k-means"),
                                                   device=self.device)
        return self._semantic_tok

    def text_tokens(self, prompts: list[str]) -> np.ndarray:
        """uint16[N, 12] MuLan tokens of each prompt (text embedding -> RVQ)."""
        return np.stack([self.mulan(p) for p in prompts])

    def _chain(self, mulan: np.ndarray, semantic_frames: int, cfg: GenerateConfig, seed: int,
               known: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """MuLan tokens uint16[B, 12] -> float32[B, samples] through the three stages."""
        known = known or {}
        b = mulan.shape[0]
        acoustic_frames = RATIO * semantic_frames
        model, layout = self.stages["semantic"]
        with progress(semantic_frames, desc="semantic") as bar:
            sem = sample_frames(model, layout, lambda s, e: {"mulan": mulan}, semantic_frames,
                                cfg.semantic.options(), b, seed, known.get("semantic"), bar)

        def coarse_cond(s: int, e: int) -> dict[str, np.ndarray]:
            return {"mulan": mulan, "semantic": sem[:, s // RATIO: -(-e // RATIO)]}

        model, layout = self.stages["coarse"]
        n_coarse = layout.spec.target[0].n_levels
        with progress(acoustic_frames, desc="coarse") as bar:
            coarse = sample_frames(model, layout, coarse_cond, acoustic_frames,
                                   cfg.coarse.options(), b, seed + 1,
                                   None if "acoustic" not in known
                                   else known["acoustic"][:, :n_coarse], bar)
        model, layout = self.stages["fine"]
        with progress(acoustic_frames, desc="fine") as bar:
            fine = sample_frames(model, layout, lambda s, e: {"acoustic": coarse[:, :, s:e]},
                                 acoustic_frames, cfg.fine.options(), b, seed + 2,
                                 None if "acoustic" not in known
                                 else known["acoustic"][:, n_coarse:], bar)
        codes = torch.from_numpy(np.concatenate([coarse, fine], axis=1).astype(np.int32))
        return self.codec.decode(codes.to(self.device)).cpu().numpy()

    def generate(self, prompts: list[str], cfg: GenerateConfig, seconds: float | None = None,
                 samples: int | None = None, seed: int | None = None) -> np.ndarray:
        """float32[len(prompts) * samples, seconds * rate]; prompt i owns rows
        [i * samples, (i + 1) * samples)."""
        seconds = cfg.seconds if seconds is None else seconds
        samples = cfg.samples if samples is None else samples
        seed = cfg.seed if seed is None else seed
        check_request(prompts, seconds, cfg.max_seconds)
        mulan = np.repeat(self.text_tokens(prompts), samples, axis=0)
        frames = max(1, round(seconds * SEMANTIC_HZ))
        out = []
        for i in range(0, mulan.shape[0], cfg.batch_size):
            out.append(self._chain(mulan[i:i + cfg.batch_size], frames, cfg, seed + 1000 * i))
        return np.concatenate(out)

    def prompt_tokens(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        """An audio prompt -> {"semantic": uint16[Ts], "acoustic": uint16[12, 2 Ts]}."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"an audio prompt must be mono samples, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise ValueError("the audio prompt holds NaN or infinite samples")
        from cantus.tokenize.semantic.model import SAMPLE_RATE as W2V_RATE

        sem = self.semantic_tokenizer.encode_batch([resample(audio, sample_rate, W2V_RATE)],
                                                   W2V_RATE)[0]
        wav = torch.from_numpy(resample(audio, sample_rate, self.sample_rate))[None]
        ac = self.codec.encode(wav.to(self.device), sample_rate=self.sample_rate)[0]
        ts = min(sem.shape[0], ac.shape[-1] // RATIO)
        if ts < 1:
            raise ValueError("the audio prompt is shorter than one semantic frame (40 ms)")
        return {"semantic": sem[:ts], "acoustic": ac.cpu().numpy()[:, :RATIO * ts]}

    def continue_audio(self, audio: np.ndarray, sample_rate: int, cfg: GenerateConfig,
                       seconds: float | None = None, prompt: str | None = None,
                       samples: int | None = None, seed: int | None = None) -> np.ndarray:
        """The prompt (re-synthesised by the codec) followed by ``seconds`` of continuation:
        float32[samples, (prompt + seconds) * rate]."""
        seconds = cfg.seconds if seconds is None else seconds
        samples = cfg.samples if samples is None else samples
        check_request(None if prompt is None else [prompt], seconds, cfg.max_seconds)
        known = self.prompt_tokens(audio, sample_rate)
        if prompt is not None:
            mulan = self.text_tokens([prompt])
        else:
            mulan = self.mulan.quantise(self.mulan.audio_embedding(
                resample(np.asarray(audio, np.float32), sample_rate,
                         self.mulan.model.cfg.sample_rate)))[None]
        b = samples
        known = {k: np.repeat(v[None], b, axis=0) for k, v in known.items()}
        frames = known["semantic"].shape[1] + max(1, round(seconds * SEMANTIC_HZ))
        return self._chain(np.repeat(mulan, b, axis=0), frames, cfg,
                           cfg.seed if seed is None else seed, known)


def trained_on(versions: dict[str, str | None]) -> str:
    """The line naming the dataset version the LM stages were trained on."""
    ids = set(versions.values())
    if ids == {None}:
        return "dataset version: not recorded (LM stages trained before they recorded it)"
    if len(ids) == 1:
        return (f"trained on dataset version {ids.pop()} "
                "(`cantus dataset show` prints that id and the sources of a version)")
    return "LM stages trained on different dataset versions: " + ", ".join(
        f"{s} {v or 'not recorded'}" for s, v in versions.items())


def write_wavs(wavs: np.ndarray, rate: int, out: str | Path) -> list[Path]:
    """One WAV per row: ``out`` itself for one row, ``stem-<i>.wav`` beside it for more."""
    import soundfile as sf

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(wavs) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.wav'}")
                                           for i in range(len(wavs))]
    for p, w in zip(paths, wavs):
        sf.write(str(p), np.clip(w, -1, 1), rate, subtype="PCM_16")
    return paths


def prompt_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """An audio prompt file -> (float32[N] mono, its sample rate): channels are averaged.

    Raises FileNotFoundError naming ``--continue PATH`` when there is no such file, and
    ValueError (the decoder's reason) when it holds no decodable audio.
    """
    from cantus.audio import AudioError, decode

    if not Path(path).is_file():
        raise FileNotFoundError(f"--continue {path}: no such file")
    try:
        audio, rate = decode(path)  # float32[C, N]
    except AudioError as e:
        raise ValueError(f"--continue: {e}") from e
    return audio.mean(axis=0) if audio.ndim == 2 else audio, rate


def _overrides(cfg: GenerateConfig, args: argparse.Namespace) -> GenerateConfig:
    stages: dict[str, Any] = {}
    for name in ("semantic", "coarse", "fine"):
        s = getattr(cfg, name)
        t = getattr(args, f"temperature_{name}")
        s = replace(s, temperature=s.temperature if t is None else t)
        if args.top_k is not None:
            s = replace(s, top_k=args.top_k)
        if args.guidance is not None and name != "fine":
            s = replace(s, guidance=args.guidance)
        stages[name] = s
    return replace(cfg, **stages, batch_size=args.batch_size or cfg.batch_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cantus generate", description=__doc__.split("\n")[0])
    p.add_argument("prompt", nargs="*", help="text prompt(s): a caption or a list of tags")
    p.add_argument("--out", required=True, help="WAV path (stem-<i>.wav when several)")
    p.add_argument("--seconds", type=float, help="duration (default generate.seconds)")
    p.add_argument("--samples", type=int, help="generations per prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--continue", dest="cont", metavar="WAV", help="audio prompt to continue")
    p.add_argument("--models", default="models", help="folder of the trained models")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--device", help="cpu, cuda (default generate.device)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    for name in ("semantic", "coarse", "fine"):
        p.add_argument(f"--temperature-{name}", type=float)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # a ConfigError is a ValueError: a bad key exits 2 like a bad request
        cfg = _overrides(load_section(args.params, "generate", GenerateConfig), args)
        if not args.cont:
            check_request(args.prompt, args.seconds or cfg.seconds, cfg.max_seconds)
        else:
            audio, rate = prompt_audio(args.cont)
        gen = Generator(model_paths(args.models), resolve_device(args.device or cfg.device))
        started = time.perf_counter()
        if args.cont:
            wavs = gen.continue_audio(audio, rate, cfg, args.seconds,
                                      " ".join(args.prompt) or None, args.samples, args.seed)
        else:
            wavs = gen.generate(args.prompt, cfg, args.seconds, args.samples, args.seed)
        wall = time.perf_counter() - started
    except (ValueError, FileNotFoundError) as e:
        from cantus.config import ConfigError

        what = "configuration error" if isinstance(e, ConfigError) else "error"
        p.exit(2, f"cantus generate: {what}: {e}\n")
    for path in write_wavs(wavs, gen.sample_rate, args.out):
        print(path)
    print(trained_on(gen.dataset_versions))
    audio_s = wavs.shape[0] * wavs.shape[1] / gen.sample_rate
    print(f"generated {audio_s:.1f} s of audio in {wall:.1f} s: real-time factor "
          f"{audio_s / max(wall, 1e-9):.2f} (audio seconds per wall second)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
