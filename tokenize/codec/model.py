"""SoundStream codec: causal SEANet encoder, residual VQ, SEANet decoder.

Goes in: mono waveforms ``float32[B, N]`` at ``sample_rate`` (24 kHz). Comes
out: acoustic tokens ``uint16[B, n_q, T]`` with ``T = ceil(N / hop)`` (hop =
product of the strides = 480, so 50 frames/s; 12 x 1024 codes = 6 kbps), and
waveforms ``float32[B, T * hop]`` decoded from any leading number of levels.

    codec = SoundStream.load("models/codec")     # safetensors + config.json
    codes = codec.encode(wav)                    # uint16[B, 12, T]
    wav_hat = codec.decode(codes[:, :4])         # 2 kbps reconstruction

Sizes: ``CodecConfig.tiny()`` (tests), ``.demo()`` (the embedded default,
trainable on a few CPU cores in minutes) and ``.paper()`` (SoundStream's
C = 32 base channels). Weights are only ever read from safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cantus.config import ConfigError, from_dict
from cantus.tokenize.codec import cpu as codec_cpu
from cantus.tokenize.codec.rvq import ResidualVQ


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {why}")


@dataclass(frozen=True)
class CodecConfig:
    """Architecture of the codec (section ``codec.model`` of params.yaml)."""

    sample_rate: int            # Hz of the waveforms it codes
    channels: int               # C: base channels, doubled at each downsampling
    dim: int                    # D: embedding size the RVQ quantises
    strides: tuple[int, ...]    # encoder downsampling factors; their product is the hop
    n_q: int                    # RVQ levels (12 -> 6 kbps at 50 Hz x 10 bits)
    codebook_size: int          # codes per level
    ema_decay: float            # EMA decay of the codebooks
    dead_threshold: float       # EMA usage under which a code is replaced
    kmeans_iters: int           # k-means iterations of the first-batch init
    quantizer_dropout: bool     # random n_q per example in training

    def __post_init__(self):
        p = "codec.model"
        _require(self.sample_rate >= 8000, f"{p}.sample_rate", "must be at least 8000")
        _require(self.channels >= 1 and self.dim >= 1, f"{p}.channels",
                 "and dim must be positive")
        _require(len(self.strides) >= 1 and all(s >= 1 for s in self.strides),
                 f"{p}.strides", "must be positive integers")
        _require(1 <= self.n_q <= 64, f"{p}.n_q", "must be in [1, 64]")
        _require(2 <= self.codebook_size <= 65536, f"{p}.codebook_size",
                 "must be in [2, 65536] (codes are stored as uint16)")
        _require(0.0 < self.ema_decay < 1.0, f"{p}.ema_decay", "must be in (0, 1)")

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    def kbps(self, n_q: int | None = None) -> float:
        bits = math.log2(self.codebook_size) * (n_q or self.n_q)
        return bits * self.frame_rate / 1000

    @classmethod
    def _base(cls, **kw) -> CodecConfig:
        d = dict(sample_rate=24000, strides=(2, 4, 6, 10), n_q=12, codebook_size=1024,
                 ema_decay=0.99, dead_threshold=2.0, kmeans_iters=10, quantizer_dropout=True)
        return cls(**{**d, **kw})

    @classmethod
    def tiny(cls) -> CodecConfig:
        """A few thousand parameters: for tests."""
        return cls._base(channels=2, dim=16, n_q=4, codebook_size=64, kmeans_iters=3,
                         dead_threshold=0.05)

    @classmethod
    def demo(cls) -> CodecConfig:
        """The embedded default: trains on a few CPU cores in minutes."""
        return cls._base(channels=8, dim=64, dead_threshold=0.05)

    @classmethod
    def paper(cls) -> CodecConfig:
        """SoundStream's C = 32 model (24 kHz, hop 480 for MusicLM's 50 Hz)."""
        return cls._base(channels=32, dim=256)


def _init_conv(conv: nn.Module, gain: float = 1.0) -> None:
    """Variance-preserving init with zero bias.

    PyTorch's default init shrinks the variance ~3x per conv and draws biases of
    ~1/sqrt(fan_in); through the encoder's depth the input's time variation then
    drowns in a constant, bias-made latent (measured at init: temporal std 0.01
    against a mean of 0.06-0.2), the first-batch k-means sees ~one vector and
    the decoder learns to ignore its input.
    """
    fan_in = conv.weight.shape[1] * conv.weight[0, 0].numel()
    if isinstance(conv, nn.ConvTranspose1d):  # weight (in, out / groups, k)
        fan_in = conv.weight.shape[0] * conv.kernel_size[0] // conv.stride[0]
    nn.init.normal_(conv.weight, 0.0, gain / math.sqrt(fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _weight_norm(conv: nn.Module) -> nn.Module:
    """SEANet's weight normalisation (magnitude and direction learnt apart)."""
    return nn.utils.parametrizations.weight_norm(conv)


def _init_and_normalise(net: nn.Module) -> None:
    """Init every conv of ``net`` (residual branches' last conv small, so the scale
    survives the depth), then weight-normalise it."""
    small = {id(u.block[3]) for u in net.modules() if isinstance(u, ResidualUnit)}
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    for m in convs:
        _init_conv(m, gain=0.3 if id(m) in small else 1.0)
        _weight_norm(m)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so frame t sees samples up to t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, d, s = self.kernel_size[0], self.dilation[0], self.stride[0]
        left = (k - 1) * d - (s - 1)
        return super().forward(F.pad(x, (left, 0)) if left else x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Transposed conv whose non-causal tail is cut: T frames -> T * stride samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y[..., :x.shape[-1] * self.stride[0]]


class ResidualUnit(nn.Module):
    """ELU, dilated k=7 conv, ELU, k=1 conv, plus the input (SEANet, hidden C/2)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        hidden = max(1, channels // 2)
        # the second ELU works in place (its input is a conv output nothing else needs):
        # on long audio, allocating a fresh output costs as much as the ELU itself
        self.block = nn.Sequential(nn.ELU(), CausalConv1d(channels, hidden, 7, dilation=dilation),
                                   nn.ELU(inplace=True), CausalConv1d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residuals(channels: int) -> list[nn.Module]:
    return [ResidualUnit(channels, d) for d in (1, 3, 9)]


class Encoder(nn.Module):
    """float[B, 1, N] -> float[B, D, N / hop]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [CausalConv1d(1, c, 7)]
        for s in cfg.strides:
            down = CausalConv1d(c, 2 * c, 2 * s, stride=s)
            layers += _residuals(c) + [nn.ELU(inplace=True), down]
            c *= 2
        layers += [nn.ELU(inplace=True), CausalConv1d(c, cfg.dim, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """float[B, D, T] -> float[B, 1, T * hop]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        c = cfg.channels * 2 ** len(cfg.strides)
        layers: list[nn.Module] = [CausalConv1d(cfg.dim, c, 7)]
        for s in reversed(cfg.strides):
            layers += [nn.ELU(inplace=True), CausalConvTranspose1d(c, c // 2, 2 * s, stride=s)]
            c //= 2
            layers += _residuals(c)
        layers += [nn.ELU(inplace=True), CausalConv1d(c, 1, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SoundStream(nn.Module):
    """Encoder -> residual VQ -> decoder; ``forward`` is the training pass."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        for net in (self.encoder, self.decoder):
            _init_and_normalise(net)
        self.quantizer = ResidualVQ(cfg.dim, cfg.n_q, cfg.codebook_size, decay=cfg.ema_decay,
                                    dead_threshold=cfg.dead_threshold,
                                    kmeans_iters=cfg.kmeans_iters,
                                    quantizer_dropout=cfg.quantizer_dropout)

    def _prepare(self, wav: torch.Tensor, sample_rate: int | None) -> torch.Tensor:
        """Check a waveform batch and pad it to whole frames: -> float[B, 1, T * hop]."""
        if sample_rate is not None and sample_rate != self.cfg.sample_rate:
            raise ValueError(f"the codec expects {self.cfg.sample_rate} Hz audio, got "
                             f"{sample_rate} Hz: resample first (cantus.audio.resample)")
        if not torch.is_tensor(wav):
            raise TypeError(f"wav must be a torch tensor, got {type(wav).__name__}")
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"wav must be mono float[B, N] (or [B, 1, N]), got {tuple(wav.shape)}")
        if wav.shape[0] == 0 or wav.shape[1] == 0:
            raise ValueError(f"empty audio: got shape {tuple(wav.shape)}")
        if not torch.isfinite(wav).all():
            raise ValueError("audio contains NaN or infinite samples")
        wav = wav.float()
        pad = (-wav.shape[1]) % self.cfg.hop
        return F.pad(wav, (0, pad))[:, None]

    def forward(self, wav: torch.Tensor, n_q: int | None = None):
        """float[B, N] -> (float[B, N'] reconstruction, int64[B, n_q, T] codes, commitment)."""
        x = self._prepare(wav, None)
        z = self.encoder(x)  # (B, D, T)
        with torch.autocast(x.device.type, enabled=False):  # nearest codes in float32
            q, codes, commit = self.quantizer(z.float(), n_q)
        return self.decoder(q)[:, 0], codes, commit

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None,
               n_q: int | None = None) -> torch.Tensor:
        """float[B, N] (or [B, 1, N]) -> uint16[B, n_q, ceil(N / hop)] acoustic tokens."""
        x = self._prepare(wav, sample_rate).to(self._device())
        if (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and (how := codec_cpu.choose(self, "encode", x)).path == "cpu"):
            z = codec_cpu.encode_latents(self.encoder, x, self.cfg.hop, self.cfg.strides, how.plan)
        else:
            z = self.encoder(x)
        # Nearest codes in float32 whatever the caller's autocast (as forward does): under
        # bf16 the distance products would round and pick other codes.
        with torch.autocast(x.device.type, enabled=False):
            codes = self.quantizer.encode(z.float(), n_q)
        return codes.to(torch.int32).to(torch.uint16)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """uint16/int[B, n, T] -> float32[B, T * hop], from the first ``n_q`` (default all n) levels."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, n_q, T], got {tuple(codes.shape)}")
        if n_q is not None:
            if not 1 <= n_q <= codes.shape[1]:
                raise ValueError(f"n_q must be in [1, {codes.shape[1]}], got {n_q}")
            codes = codes[:, :n_q]
        codes = codes.to(torch.int32).long().to(self._device())
        with torch.autocast(codes.device.type, enabled=False):
            q = self.quantizer.decode(codes)
        if (q.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and (how := codec_cpu.choose(self, "decode", q)).path == "cpu"):
            return codec_cpu.decode_waveform(self.decoder, q, self.cfg.hop, how.plan)[:, 0]
        return self.decoder(q)[:, 0].float()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, folder: str | Path) -> str:
        """Write model.safetensors + config.json; returns the weights' sha256."""
        from cantus.training import save_weights

        return save_weights(self, folder, self.cfg, extra={"kind": "soundstream",
                                                           "hop": self.cfg.hop})

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> SoundStream:
        """Build from ``folder/config.json`` and load ``folder/model.safetensors``."""
        from cantus.training import load_weights, read_config

        meta = read_config(folder)
        if meta.pop("kind", "soundstream") != "soundstream":
            raise ValueError(f"{folder} does not hold a SoundStream codec")
        meta.pop("hop", None)
        model = cls(from_dict(CodecConfig, meta, prefix="config.json"))
        load_weights(model, folder, device=device)
        return model.to(device).eval()


def config_json(cfg: CodecConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


__all__ = ["CodecConfig", "SoundStream", "replace"]
