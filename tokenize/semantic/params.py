"""Hyperparameters of the semantic tokens (section ``semantic`` of params.yaml).

``semantic.model`` says where the w2v-BERT weights come from, ``pretrain``
how ``semantic_pretrain`` trains them when no checkpoint is given, ``kmeans``
which layer is clustered into how many tokens, and ``eval`` how
``semantic_eval`` runs. Each part is a frozen dataclass; an unknown key, a
missing key or a bad value fails at start-up naming the dotted key
(``cantus.config.load_section``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cantus.config import ConfigError
from cantus.tokenize.semantic.model import SIZES


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {why}")


@dataclass(frozen=True)
class WeightsConfig:
    """Where the w2v-BERT weights come from (``semantic.model``)."""

    checkpoint: str             # local HF checkpoint folder; "" = pretrain on our shards
    size: Literal["tiny", "demo", "paper"]
    utterance_norm: bool        # front end normalises each mel bin per clip (w2v-BERT 2.0 does)

    def __post_init__(self):
        _require(self.size in SIZES, "semantic.model.size", f"must be one of {list(SIZES)}")


@dataclass(frozen=True)
class PretrainConfig:
    """w2v-BERT self-supervised pretraining on the audio shards."""

    seed: int
    steps: int                  # optimiser steps
    batch_size: int
    crop_seconds: float         # random crop per example
    lr: float                   # peak AdamW learning rate
    warmup_steps: int           # linear warm-up, then cosine decay to 10%
    weight_decay: float
    grad_clip: float            # max gradient norm (0: off)
    mask_prob: float            # probability a 50 Hz frame starts a masked span
    mask_length: int            # span length in frames
    codebook_size: int          # entries of the learned quantiser (= MLM classes)
    codevector_dim: int         # width of the quantised targets
    num_negatives: int          # contrastive distractors per masked frame
    temperature: float          # contrastive softmax temperature
    gumbel_start: float         # Gumbel-softmax temperature, annealed linearly
    gumbel_end: float
    diversity_weight: float     # weight of the codebook-diversity loss
    mlm_weight: float           # weight of the masked-prediction cross-entropy
    dropout: float              # hidden and attention dropout of the conformer
    checkpoint_every: int       # steps between resumable checkpoints
    keep_checkpoints: int
    log_every: int              # steps between metric log lines
    num_workers: int            # DataLoader workers for the audio stream
    device: str                 # "auto", "cpu", "cuda", ...

    def __post_init__(self):
        p = "semantic.pretrain"
        _require(self.steps >= 0, f"{p}.steps", "must be >= 0")
        _require(self.batch_size >= 1, f"{p}.batch_size", "must be at least 1")
        _require(self.crop_seconds > 0, f"{p}.crop_seconds", "must be positive")
        _require(0 < self.mask_prob < 1, f"{p}.mask_prob", "must be in (0, 1)")
        _require(self.mask_length >= 1, f"{p}.mask_length", "must be at least 1")
        _require(self.codebook_size >= 2, f"{p}.codebook_size", "must be at least 2")
        _require(self.num_negatives >= 1, f"{p}.num_negatives", "must be at least 1")
        _require(self.temperature > 0, f"{p}.temperature", "must be positive")
        _require(self.gumbel_start >= self.gumbel_end > 0, f"{p}.gumbel_end",
                 "must be positive and at most gumbel_start")
        _require(self.checkpoint_every >= 1, f"{p}.checkpoint_every", "must be at least 1")


@dataclass(frozen=True)
class KMeansConfig:
    """Features and clustering of the semantic tokens (``semantic.kmeans``)."""

    layer: int                # 1-based conformer layer; 0 = MusicLM's depth (default_layer)
    token_rate: int           # frames per second of the tokens (divides 50)
    clusters: int             # K
    max_frames: int           # reservoir size: frames the fit sees at most
    iterations: int           # k-means iterations
    restarts: int             # k-means runs from different seeds; the best is kept
    seed: int
    batch_size: int           # clips per feature forward pass
    device: str               # "auto", "cpu", "cuda", ...

    def __post_init__(self):
        for key, ok in (("clusters", self.clusters >= 2), ("max_frames", self.max_frames >= 2),
                        ("iterations", self.iterations >= 1), ("restarts", self.restarts >= 1),
                        ("batch_size", self.batch_size >= 1),
                        ("token_rate", self.token_rate >= 1 and 50 % self.token_rate == 0)):
            if not ok:
                raise ConfigError(f"'semantic.kmeans.{key}' has a bad value")
        if self.max_frames < self.clusters:
            raise ConfigError("'semantic.kmeans.max_frames' must be at least clusters")


@dataclass(frozen=True)
class EvalConfig:
    """How ``semantic_eval`` extracts features (``semantic.eval``); the log-mel
    baseline is clustered with ``semantic.kmeans``'s K, iterations and seed."""

    batch_size: int             # clips per feature forward pass
    device: str                 # "auto", "cpu", "cuda", ...

    def __post_init__(self):
        _require(self.batch_size >= 1, "semantic.eval.batch_size", "must be at least 1")


@dataclass(frozen=True)
class SemanticConfig:
    model: WeightsConfig
    pretrain: PretrainConfig
    kmeans: KMeansConfig
    eval: EvalConfig
