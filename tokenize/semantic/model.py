"""The w2v-BERT backbone of the semantic tokens, and its frame features.

Goes in: 16 kHz mono audio (float32[N]) and a ``Wav2Vec2BertModel``, either
built at a named size (``tiny`` for tests, ``demo`` for the embedded default,
``paper`` for the 600M w2v-BERT XL of MusicLM) and pretrained by
``semantic_pretrain``, or loaded from a local checkpoint a user already has
(``from_pretrained(path, local_files_only=True)``, e.g. ``facebook/w2v-bert-2.0``
saved on disk). Comes out: float32[T, D] hidden states of one conformer layer,
average-pooled from the model's 50 Hz to ``token_rate`` (25 Hz), T =
floor(N / 16000 * token_rate).

The library entry points are ``build``, ``load``, ``default_layer`` and
``FeatureExtractor``; the stage command lives in ``semantic_pretrain``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000          # the SeamlessM4T front end's rate
MODEL_RATE = 50              # fbank at 100 Hz stacked by 2
_WIN, _HOP = 400, 160        # fbank window and hop in samples (25 ms, 10 ms)

# Contrastive layers + MLM layers = the conformer stack. "paper" is w2v-BERT XL
# (0.6B): 24 conformer layers of width 1024, 12 contrastive then 12 MLM.
SIZES = {
    "tiny": dict(hidden=32, contrastive=1, mlm=2, heads=2, ffn=64, kernel=7),
    "demo": dict(hidden=128, contrastive=2, mlm=3, heads=4, ffn=256, kernel=15),
    "paper": dict(hidden=1024, contrastive=12, mlm=12, heads=16, ffn=4096, kernel=31),
}
PAPER_LAYER = 12 + 7         # "the 7th layer of the MLM module" of w2v-BERT XL


def build(size: str, dropout: float = 0.0, utterance_norm: bool = True):
    """A randomly initialised ``Wav2Vec2BertModel`` of a named size."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    s = SIZES[size]
    cfg = Wav2Vec2BertConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["contrastive"] + s["mlm"],
        num_attention_heads=s["heads"], intermediate_size=s["ffn"],
        conv_depthwise_kernel_size=s["kernel"], hidden_dropout=dropout,
        attention_dropout=dropout, activation_dropout=dropout, feat_proj_dropout=dropout,
        conformer_conv_dropout=dropout, layerdrop=0.0, mask_time_prob=0.05,
        mask_feature_prob=0.0, apply_spec_augment=True,
        cantus_contrastive_layers=s["contrastive"], cantus_utterance_norm=utterance_norm)
    return Wav2Vec2BertModel(cfg)


def contrastive_layers(config) -> int:
    """Layers of the contrastive module; checkpoints that do not say get half the stack."""
    n = getattr(config, "cantus_contrastive_layers", None)
    return int(n) if n is not None else config.num_hidden_layers // 2


def default_layer(config) -> int:
    """MusicLM's layer (7th of the MLM module of 24) at the same relative depth."""
    n = config.num_hidden_layers
    return max(1, min(n, round(n * PAPER_LAYER / 24)))


def load(path: str | Path, device: str = "cpu"):
    """A ``Wav2Vec2BertModel`` from a local checkpoint folder (never the hub)."""
    from transformers import Wav2Vec2BertModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no w2v-BERT checkpoint at {path} (expected config.json "
                                "and weights written by save_pretrained)")
    hf_logging.disable_progress_bar()
    model = Wav2Vec2BertModel.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval()


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a checkpoint's config and weight files (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    if not files:
        raise FileNotFoundError(f"no checkpoint files in {path}")
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def num_frames(num_samples: int, token_rate: int) -> int:
    """Frames of ``num_samples`` of 16 kHz audio at ``token_rate`` Hz."""
    return num_samples * token_rate // SAMPLE_RATE


def _relative_key_bias(module, query: torch.Tensor, key: torch.Tensor):
    """transformers' ``relative_key`` position bias, without its [T, T, head] tensor.

    The bias of query i and key j is q_i . E[clamp(j - i)] * scaling, with E the
    module's ``distance_embedding`` of only left + right + 1 rows. transformers
    looks E up for every (i, j) pair, a [T, T, head] tensor (128 MB per layer
    for a 20 s clip of the demo model), then contracts it with the queries.
    Here the queries meet the few rows of E once, [B, H, T, rows], and each pair
    gathers its entry: the same dot products (equal to float rounding;
    tests/test_semantic.py compares), in about half the memory.
    """
    lq, lk = query.shape[2], key.shape[2]
    left, right = module.left_max_position_embeddings, module.right_max_position_embeddings
    pos = torch.arange(max(lq, lk), device=query.device)
    rows = (pos[None, :lk] - pos[:lq, None]).clamp_(-left, right).add_(left)   # (T_q, T_k)
    table = module.distance_embedding.weight.to(query.dtype)                  # (rows, head)
    per_row = torch.matmul(query, table.t()).mul_(module.scaling)             # (B, H, T_q, rows)
    return query, per_row.gather(3, rows.expand(*query.shape[:2], lq, lk))


def use_compact_relative_bias() -> None:
    """Route transformers' Wav2Vec2-BERT ``relative_key`` bias through
    ``_relative_key_bias`` (process-wide, idempotent; transformers is pinned in
    pyproject.toml and the test compares the two on every run)."""
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as w2v

    global transformers_relative_bias
    if w2v._apply_relative_key_position_encoding is not _relative_key_bias:
        transformers_relative_bias = w2v._apply_relative_key_position_encoding
        w2v._apply_relative_key_position_encoding = _relative_key_bias


transformers_relative_bias = None  # transformers' own, kept once replaced (for the test)


class FeatureExtractor:
    """Audio -> normalisable frame features of one layer, pooled to ``token_rate``.

    Args:
        model: a ``Wav2Vec2BertModel`` (``build`` or ``load``); used up to ``layer``.
        layer: 1-based conformer layer whose output is taken (0: ``default_layer``).
        token_rate: output frame rate; must divide the model's 50 Hz.
    """

    def __init__(self, model, layer: int = 0, token_rate: int = 25):
        from transformers import SeamlessM4TFeatureExtractor

        n = model.config.num_hidden_layers
        self.layer = layer or default_layer(model.config)
        if not 1 <= self.layer <= n:
            raise ValueError(f"layer {self.layer} out of range: the model has {n} layers")
        if token_rate < 1 or MODEL_RATE % token_rate:
            raise ValueError(f"token_rate {token_rate} must divide the model's {MODEL_RATE} Hz")
        self.model, self.token_rate, self.pool = model, token_rate, MODEL_RATE // token_rate
        use_compact_relative_bias()
        self.front = SeamlessM4TFeatureExtractor()
        # w2v-BERT 2.0 normalises each mel bin per utterance; models we train may not
        # (that erases the long-term spectrum, i.e. much of the timbre).
        self.utterance_norm = bool(getattr(model.config, "cantus_utterance_norm", True))
        self.dim = model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fbank(self, wavs: list[np.ndarray], sample_rate: int) -> tuple[torch.Tensor,
                                                                      torch.Tensor, list[int]]:
        """Stacked fbank float32[B, 2T', 160], mask[B, 2T'] and each clip's T (token rate)."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"w2v-BERT takes {SAMPLE_RATE} Hz audio, got {sample_rate} Hz: "
                             "resample first (cantus.audio.resample)")
        frames = []
        for x in wavs:
            if x.ndim != 1:
                raise ValueError(f"expected mono float audio [N], got shape {x.shape}")
            t = num_frames(x.shape[0], self.token_rate)
            if t < 1:
                raise ValueError(f"audio of {x.shape[0]} samples is shorter than one "
                                 f"{1000 // self.token_rate} ms frame")
            frames.append(t)
        # Padding by one window's overhang gives exactly 2 * 50/rate fbank frames per token.
        pad = _WIN - _HOP
        clips = [np.pad(np.asarray(x, np.float32), (pad // 2, pad - pad // 2)) for x in wavs]
        out = self.front(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True,
                         return_attention_mask=True,
                         do_normalize_per_mel_bins=self.utterance_norm)
        return out["input_features"], out["attention_mask"], frames

    @torch.no_grad()
    def __call__(self, wavs: list[np.ndarray], sample_rate: int) -> list[torch.Tensor]:
        """Features of each clip: float32[T_i, D] on the model's device."""
        feats, mask, frames = self.fbank(wavs, sample_rate)
        h = self.hidden(feats.to(self.device), mask.to(self.device))  # (B, T50, D)
        out = []
        for i, t in enumerate(frames):
            x = h[i, :t * self.pool]                                   # (T*pool, D)
            out.append(x.reshape(t, self.pool, -1).mean(1).float())     # (T, D)
        return out

    def hidden(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output of conformer layer ``layer`` at 50 Hz: (B, T50, D); later layers skipped."""
        m = self.model
        h, _ = m.feature_projection(feats)                             # (B, T50, D)
        full = m.encoder.layers
        try:
            m.encoder.layers = full[:self.layer]
            return m.encoder(h, attention_mask=mask).last_hidden_state
        finally:
            m.encoder.layers = full
