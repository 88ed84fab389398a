"""Hyperparameters of MuLan (section ``mulan`` of params.yaml).

``mulan.model`` builds the two towers, ``mulan.train`` the contrastive run,
``mulan.rvq`` the residual k-means that turns an embedding into 12 tokens and
``mulan.eval`` the retrieval and zero-shot metrics. Every key is required;
unknown keys are rejected by name (``cantus.config.load_section``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cantus.config import ConfigError


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {why}")


_DEMO: dict[str, Any] = dict(
    sample_rate=24000, window_seconds=10.0, stride_seconds=1.0, n_fft=1024, hop=480, n_mels=64,
    channels=(16, 32, 64, 128), blocks=(1, 1, 1, 1), embed_dim=128, proj_hidden=512,
    dropout=0.1, text_model="minilm", text_max_tokens=64, freeze_text=True,
    init_temperature=0.07)


@dataclass(frozen=True)
class MulanModelConfig:
    """Audio tower on log-mels of fixed windows, text tower from a BERT checkpoint."""

    sample_rate: int
    window_seconds: float      # one audio embedding sees this much audio
    stride_seconds: float      # long audio: windows this far apart, embeddings averaged
    n_fft: int
    hop: int                   # mel frames every hop samples (50 Hz at 24 kHz with 480)
    n_mels: int
    channels: tuple[int, ...]  # ResNet stages (each halves F and T)
    blocks: tuple[int, ...]    # residual blocks per stage
    embed_dim: int             # the joint space (128 in MuLan)
    proj_hidden: int           # projection MLP width (0: one linear layer)
    dropout: float
    text_model: str            # "minilm" (bundled), "tiny" (random, tests) or a local path
    text_max_tokens: int
    freeze_text: bool          # keep the pretrained text tower fixed, train its head
    init_temperature: float

    def __post_init__(self):
        k = "mulan.model."
        _require(self.window_seconds > 0, k + "window_seconds", "must be positive")
        _require(0 < self.stride_seconds <= self.window_seconds, k + "stride_seconds",
                 "must be in (0, window_seconds]")
        _require(self.hop > 0 and self.n_fft >= self.hop, k + "hop", "must be in (0, n_fft]")
        _require(len(self.channels) == len(self.blocks) > 0, k + "blocks",
                 "must have one entry per entry of channels")
        _require(all(c % 8 == 0 for c in self.channels), k + "channels",
                 "must be multiples of 8 (group norm)")
        _require(self.embed_dim > 0, k + "embed_dim", "must be positive")
        _require(0 < self.init_temperature < 1, k + "init_temperature", "must be in (0, 1)")

    @property
    def window(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def stride(self) -> int:
        return int(round(self.stride_seconds * self.sample_rate))

    @classmethod
    def demo(cls, **kw: Any) -> MulanModelConfig:
        """The size params.yaml trains on the demo corpus (minutes on 2 CPU cores)."""
        return cls(**{**_DEMO, **kw})

    @classmethod
    def tiny(cls, **kw: Any) -> MulanModelConfig:
        """A debug-size model for tests: 1 s windows, 8-16 channels, random text tower."""
        base = dict(_DEMO, sample_rate=8000, window_seconds=1.0, stride_seconds=0.5, n_fft=256,
                    hop=128, n_mels=16, channels=(8, 16), blocks=(1, 1), embed_dim=16,
                    proj_hidden=0, dropout=0.0, text_model="tiny", text_max_tokens=16,
                    freeze_text=False)
        return cls(**{**base, **kw})

    @classmethod
    def paper(cls, **kw: Any) -> MulanModelConfig:
        """Paper-scale audio tower (ResNet-34 layout on 128 mels), MiniLM fine-tuned."""
        base = dict(_DEMO, n_mels=128, hop=240, channels=(64, 128, 256, 512), blocks=(3, 4, 6, 3),
                    proj_hidden=1024, freeze_text=False)
        return cls(**{**base, **kw})


@dataclass(frozen=True)
class MulanTrainConfig:
    seed: int
    steps: int                 # optimiser steps (the demo budget)
    batch_size: int            # per rank; negatives are gathered across ranks
    lr: float
    text_lr: float             # for the text tower when it is not frozen
    weight_decay: float
    warmup_steps: int
    grad_clip: float           # max gradient norm (0: off)
    num_workers: int           # DataLoader workers
    shuffle_buffer: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    caption_prob: float        # chance a sample's text is its caption, else a tag list
    tag_keep: float            # chance each tag survives in a tag list (one always does)

    def __post_init__(self):
        k = "mulan.train."
        _require(self.steps > 0, k + "steps", "must be positive")
        _require(self.batch_size >= 2, k + "batch_size", "must be at least 2 (negatives)")
        _require(self.lr > 0, k + "lr", "must be positive")
        _require(0 <= self.caption_prob <= 1, k + "caption_prob", "must be in [0, 1]")
        _require(0 < self.tag_keep <= 1, k + "tag_keep", "must be in (0, 1]")
        _require(self.checkpoint_every > 0, k + "checkpoint_every", "must be positive")


@dataclass(frozen=True)
class MulanRVQConfig:
    levels: int                # 12 in MusicLM
    codebook_size: int         # 1024 in MusicLM (uint16 tokens)
    kmeans_iters: int
    seed: int
    fit_stride_seconds: float  # window embeddings used for the fit are this far apart
    min_points_per_code: int   # a level uses at most N / this codes (small corpora); 1: off
    max_embeddings: int = 262144  # the fit's seeded sample of train embeddings holds at most this

    def __post_init__(self):
        k = "mulan.rvq."
        _require(self.levels >= 1, k + "levels", "must be at least 1")
        _require(2 <= self.codebook_size <= 65536, k + "codebook_size",
                 "must be in [2, 65536] (uint16 tokens)")
        _require(self.fit_stride_seconds > 0, k + "fit_stride_seconds", "must be positive")
        _require(self.min_points_per_code >= 1, k + "min_points_per_code", "must be at least 1")
        _require(self.max_embeddings >= 1, k + "max_embeddings", "must be at least 1")


@dataclass(frozen=True)
class MulanEvalConfig:
    prompts: dict[str, str]    # tag name -> zero-shot prompt template with {}
    recall_at: tuple[int, ...]

    def __post_init__(self):
        for tag, tpl in self.prompts.items():
            _require("{}" in tpl, f"mulan.eval.prompts.{tag}", "must contain {}")


@dataclass(frozen=True)
class MulanConfig:
    model: MulanModelConfig
    train: MulanTrainConfig
    rvq: MulanRVQConfig
    eval: MulanEvalConfig


def model_config_from_json(data: dict[str, Any]) -> MulanModelConfig:
    """The model config saved beside the weights (other keys there are ignored)."""
    from cantus.config import from_dict

    names = {f.name for f in dataclasses.fields(MulanModelConfig)}
    return from_dict(MulanModelConfig, {k: v for k, v in data.items() if k in names},
                     prefix="mulan.model")
