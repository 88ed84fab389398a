"""Params of the LM stages (section ``lm`` of params.yaml) and trained-stage folders.

``load_lm(params)`` reads section ``lm``: ``lm.tokens`` (levels, what the
token manifest must say; each field's codebook size comes from the manifest) and one ``StageConfig`` per stage
(``lm.semantic``, ``lm.coarse``, ``lm.fine``: crop, model size, training).

A trained stage is a folder (``models/lm_<stage>``): ``model.safetensors``
plus ``config.json`` holding the model config and the layout. Generation
loads it with::

    model, layout = load_stage("models/lm_coarse")   # Transformer (eval mode), Layout
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from collections.abc import Mapping
from typing import Any

from cantus.config import ConfigError, from_dict, read_params, to_dict
from cantus.training import load_weights, read_config, save_weights

from .layout import FIELDS, PAPER_SIZES, STAGES, Layout, check_sizes, stage_spec, unaligned
from .model import GPTConfig, ModelSize, Transformer


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {why}")


@dataclass(frozen=True)
class TokensConfig:
    """What the token shards hold; ``expect`` is checked against their manifest.

    Each field's codebook size is not set here: it is read from the shards' manifest
    (``token_sizes``), so a k-means K or a MuLan RVQ sized to the data needs no other key.
    """

    acoustic_levels: int       # RVQ levels of the codec (12)
    coarse_levels: int         # levels the coarse stage predicts (4); fine predicts the rest
    mulan_levels: int          # RVQ levels of the MuLan tokens (12)
    expect: dict[str, Any]     # manifest "tokenizers" entries this run requires

    def __post_init__(self):
        _require(0 < self.coarse_levels < self.acoustic_levels, "lm.tokens.coarse_levels",
                 "must be in (0, acoustic_levels)")


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    steps: int                 # optimiser steps
    batch_size: int            # crops per micro-batch per rank
    grad_accum: int            # micro-batches per optimiser step
    lr: float
    min_lr_ratio: float        # the cosine ends at lr * min_lr_ratio
    warmup_steps: int
    weight_decay: float        # on matrices only (not norms, not the embedding)
    betas: tuple[float, ...]
    grad_clip: float           # max global grad norm (0: off)
    num_workers: int           # DataLoader workers
    shuffle_buffer: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    valid_every: int           # validation every N steps (and at the end)
    valid_samples: int         # fixed validation crops
    unigram_samples: int       # training crops the unigram baseline is counted on
    bf16: bool                 # autocast to bfloat16 (CUDA only)
    compile: bool              # torch.compile the model (CUDA only)

    def __post_init__(self):
        k = "lm.<stage>.train."
        _require(self.steps >= 1, k + "steps", "must be at least 1")
        _require(self.batch_size >= 1, k + "batch_size", "must be at least 1")
        _require(self.grad_accum >= 1, k + "grad_accum", "must be at least 1")
        _require(self.lr > 0, k + "lr", "must be positive")
        _require(0 <= self.min_lr_ratio <= 1, k + "min_lr_ratio", "must be in [0, 1]")
        _require(0 <= self.warmup_steps < self.steps, k + "warmup_steps", "must be in [0, steps)")
        _require(len(self.betas) == 2, k + "betas", "must be two numbers")
        _require(self.checkpoint_every >= 1, k + "checkpoint_every", "must be at least 1")
        _require(self.valid_every >= 1, k + "valid_every", "must be at least 1")
        _require(self.valid_samples >= 1, k + "valid_samples", "must be at least 1")


@dataclass(frozen=True)
class StageConfig:
    crop_seconds: float        # paper: 30 / 10 / 3 s for semantic / coarse / fine
    dedup_semantic: bool       # remove consecutive repeated semantic tokens
    cond_dropout: float        # probability of replacing MuLan tokens by null (CFG)
    model: ModelSize
    train: TrainConfig
    aligned_cond: bool = False  # each position also gets its target's conditioning frame

    def __post_init__(self):
        _require(self.crop_seconds > 0, "lm.<stage>.crop_seconds", "must be positive")
        _require(0 <= self.cond_dropout < 1, "lm.<stage>.cond_dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class LMConfig:
    tokens: TokensConfig
    semantic: StageConfig
    coarse: StageConfig
    fine: StageConfig


def load_lm(path: str | Path) -> LMConfig:
    data = read_params(path)
    if "lm" not in data:
        raise ConfigError(f"{path}: missing section 'lm'")
    return from_dict(LMConfig, data["lm"], prefix="lm")


def token_sizes(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Each field's codebook size K, from a token manifest's ``tokenizers`` entries."""
    tok = manifest.get("tokenizers", {})
    keys = {"acoustic": "codebook_size", "semantic": "k", "mulan": "codebook_size"}
    missing = [f"{f}.{k}" for f, k in keys.items() if k not in tok.get(f, {})]
    if missing:
        raise ConfigError(f"token manifest has no {', '.join(missing)}: the codebook sizes "
                          "the LM layout needs")
    return check_sizes({f: tok[f][k] for f, k in keys.items()}, "token manifest")


def make_layout(tokens: TokensConfig, stage: str, cfg: StageConfig,
                sizes: Mapping[str, int] | None = None) -> Layout:
    """The stage's layout; ``sizes`` from ``token_sizes`` (None: the paper's 1024 per field,
    for benches on random tokens)."""
    spec = stage_spec(stage, tokens.coarse_levels, tokens.acoustic_levels, tokens.mulan_levels)
    dedup = cfg.dedup_semantic and "semantic" in spec.fields
    if cfg.aligned_cond and unaligned(spec, dedup):
        raise ConfigError(f"'lm.{stage}.aligned_cond' needs 'lm.{stage}.dedup_semantic' false: "
                          "deduplicated semantic tokens are not aligned in time")
    return Layout(spec, PAPER_SIZES if sizes is None else sizes, cfg.crop_seconds, dedup,
                  cfg.aligned_cond)


def build_model(size: ModelSize, layout: Layout) -> Transformer:
    return Transformer(GPTConfig(**dataclasses.asdict(size), vocab_size=layout.vocab_size,
                                 cond_width=layout.cond_width))


def _plain(v: Any) -> Any:
    return to_dict(v) if dataclasses.is_dataclass(v) else (
        dict(v) if isinstance(v, MappingProxyType) else v)


def save_stage(model: Transformer, layout: Layout, tokens: TokensConfig, folder: str | Path,
               extra: dict[str, Any] | None = None) -> str:
    """Write a trained stage folder; returns the weights' sha256."""
    info = {"stage": layout.spec.name, "crop_seconds": layout.crop_seconds,
            "dedup_semantic": layout.dedup, "aligned": layout.aligned, "sizes": layout.sizes,
            "tokens": {k: _plain(v) for k, v in
                                                      to_dict(tokens).items()}}
    return save_weights(model, folder, model.cfg, extra={"layout": info, **(extra or {})})


def load_stage(folder: str | Path, device: str = "cpu") -> tuple[Transformer, Layout]:
    """A trained stage folder -> (model in eval mode on ``device``, its Layout)."""
    cfg = read_config(folder)
    info = cfg["layout"]
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = Transformer(GPTConfig(**{k: v for k, v in cfg.items() if k in fields}))
    t = info["tokens"]
    spec = stage_spec(info["stage"], t["coarse_levels"], t["acoustic_levels"], t["mulan_levels"])
    sizes = info.get("sizes") or dict.fromkeys(FIELDS, t["codebook_size"])  # older: one K
    layout = Layout(spec, sizes, info["crop_seconds"], info["dedup_semantic"],
                    info.get("aligned", False))
    load_weights(model, folder, device=device)
    return model.to(device).eval(), layout


__all__ = ["STAGES", "LMConfig", "StageConfig", "TokensConfig", "TrainConfig", "build_model",
           "load_lm", "load_stage", "make_layout", "save_stage", "token_sizes"]
