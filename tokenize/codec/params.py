"""Hyperparameters of the SoundStream codec (section ``codec`` of params.yaml).

``codec.model`` is the codec's size (``CodecConfig``, saved beside its
weights), ``disc`` the discriminators', ``loss`` the loss weights, ``train``
the trainer's schedule and ``eval`` how ``codec_eval`` scores it. Each part is
a frozen dataclass; an unknown key, a missing key or a bad value fails at
start-up naming the dotted key (``cantus.config.load_section``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cantus.config import ConfigError
from cantus.tokenize.codec.model import CodecConfig


@dataclass(frozen=True)
class DiscConfig:
    """Discriminator sizes (section ``codec.disc``)."""

    scales: int           # waveform discriminators (paper: 3, at 1x, 1/2x, 1/4x)
    wave_channels: int    # first-layer channels of each waveform discriminator
    stft_channels: int    # first-layer channels of the STFT discriminator
    stft_window: int      # STFT discriminator window (paper: 1024, hop 256)

    def __post_init__(self):
        if self.scales < 1 or self.wave_channels < 1 or self.stft_channels < 1:
            raise ConfigError("'codec.disc' sizes must be positive")
        if self.stft_window < 16 or self.stft_window & (self.stft_window - 1):
            raise ConfigError("'codec.disc.stft_window' must be a power of two >= 16")


@dataclass(frozen=True)
class LossWeights:
    """Loss weights (paper: adversarial 1, feature 100, reconstruction 1)."""

    adversarial: float
    feature: float
    reconstruction: float     # multi-scale log-mel L1
    waveform: float           # time-domain L1, relative to the mean |amplitude|
    commitment: float


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    device: str               # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int              # torch CPU threads (0: torch's default)
    steps: int                # total generator steps (the demo's time budget)
    batch_size: int
    crop_seconds: float       # random crop length per example
    lr: float                 # generator AdamW peak learning rate
    disc_lr: float            # discriminator AdamW peak learning rate
    betas: tuple[float, ...]  # AdamW betas (GAN practice: 0.5, 0.9)
    weight_decay: float
    warmup_steps: int         # linear learning-rate warm-up, then cosine to 10%
    adversarial_start: int    # reconstruction-only steps before the GAN losses switch on
    grad_clip: float          # max gradient norm (0: off)
    num_workers: int          # DataLoader workers (0: in-process)
    shuffle_buffer: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    sample_every: int         # reconstruction samples every N steps (0: only at the end)
    sample_chunks: int        # fixed validation chunks rendered
    sample_seconds: float     # seconds of each rendered

    def __post_init__(self):
        p = "codec.train"
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{p}.{key}' must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"'{p}.device' must be auto, cpu or cuda, got {self.device!r}")
        if self.crop_seconds <= 0 or self.lr <= 0 or self.disc_lr <= 0:
            raise ConfigError(f"'{p}.crop_seconds', lr and disc_lr must be positive")
        if len(self.betas) != 2:
            raise ConfigError(f"'{p}.betas' must be two numbers")


@dataclass(frozen=True)
class CodecParams:
    """What the codec trainer reads: ``codec.model``, ``disc``, ``loss`` and ``train``."""

    model: CodecConfig
    disc: DiscConfig
    loss: LossWeights
    train: TrainConfig


@dataclass(frozen=True)
class EvalConfig:
    """How ``codec_eval`` scores the codec (``codec.eval``)."""

    split: str                       # shards evaluated ("valid")
    bitrates_kbps: tuple[float, ...]  # codec bitrates (n_q = kbps / per-level kbps)
    opus_kbps: float                 # the Opus baseline's bitrate
    max_chunks: int                  # at most this many chunks (0: all)
    max_seconds: float               # first seconds of each chunk (0: whole chunk)
    batch_size: int
    device: str                      # "auto", "cpu" or "cuda"

    def __post_init__(self):
        if not self.bitrates_kbps or min(self.bitrates_kbps) <= 0:
            raise ConfigError("'codec.eval.bitrates_kbps' must list positive bitrates")
        if self.opus_kbps < 6 or self.opus_kbps > 510:
            raise ConfigError("'codec.eval.opus_kbps' must be in [6, 510] (libopus range)")
        if self.batch_size < 1:
            raise ConfigError("'codec.eval.batch_size' must be at least 1")


@dataclass(frozen=True)
class CodecSection:
    """The whole ``codec`` section."""

    model: CodecConfig
    disc: DiscConfig
    loss: LossWeights
    train: TrainConfig
    eval: EvalConfig

    def training(self) -> CodecParams:
        """The parts the trainer reads (its run id hashes these, not ``eval``)."""
        return CodecParams(self.model, self.disc, self.loss, self.train)
