"""The decoder-only transformer of the semantic, coarse and fine stages.

Goes in: int64[B, T] token ids of one stage's layout (``layout.py``). Comes
out: hidden states float[B, T, D], or logits float[B, T, V] over the stage's
whole vocabulary (the embedding is tied to the output head). Pre-norm blocks,
fused ``scaled_dot_product_attention``, RoPE or T5-style relative position
bias, optional aligned conditioning (``cond``: ids of another table summed into
each position's input, ``layout.aligned_cond``), and a ``KVCache`` so generation
feeds one token at a time:

    model = Transformer(GPTConfig(vocab_size=layout.vocab_size, **asdict(demo())))
    cache = model.new_cache(batch=2, max_len=layout.max_len)
    logits = model(prefix, cache=cache)        # (B, P, V); cache.length == P
    logits = model(next_ids, cache=cache)      # (B, 1, V); cache.length == P + 1

No I/O here; ``stage.py`` saves and loads trained stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelSize:
    """The sizes a params section sets (``lm.<stage>.model``)."""

    layers: int
    heads: int
    dim: int
    ffn: int
    dropout: float
    position: str = "rope"    # "rope" or "t5" (relative position bias, as MusicLM)

    def __post_init__(self):
        from cantus.config import ConfigError

        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError(f"model.dim={self.dim} must split into {self.heads} heads of "
                              "even size")
        if self.position not in ("rope", "t5"):
            raise ConfigError(f"model.position must be 'rope' or 't5', got {self.position!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.dropout must be in [0, 1)")


def tiny() -> ModelSize:
    """For tests: trains in seconds on a CPU."""
    return ModelSize(layers=2, heads=2, dim=32, ffn=64, dropout=0.0)


def demo() -> ModelSize:
    """The embedded default (params.yaml ``lm.*.model``): minutes on 2 CPU cores."""
    return ModelSize(layers=3, heads=4, dim=128, ffn=512, dropout=0.1)


def paper() -> ModelSize:
    """MusicLM / AudioLM: 24 layers, 16 heads, d 1024, FFN 4096, dropout 0.1."""
    return ModelSize(layers=24, heads=16, dim=1024, ffn=4096, dropout=0.1, position="t5")


@dataclass(frozen=True)
class GPTConfig(ModelSize):
    vocab_size: int = 0
    rel_buckets: int = 32          # T5 relative bias: buckets and the distance of the last
    rel_max_distance: int = 128
    cond_width: int = 0            # aligned conditioning ids per position (layout.cond_width)


class KVCache:
    """Keys and values of every layer for positions [0, length): float[L, B, H, max_len, Dh].

    ``dtype`` None (the default): the dtype of the first keys stored, so a model run
    under bf16 autocast caches bf16 (half the memory, and the dtype attention gets).
    """

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype: torch.dtype | None = None):
        self.shape, self.device = (layers, batch, heads, max_len, head_dim), device
        self.k = self.v = None
        if dtype is not None:
            self._allocate(dtype)
        self.length = 0

    def _allocate(self, dtype: torch.dtype) -> None:
        self.k = torch.zeros(self.shape, device=self.device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, Dh) at [length, length + T); return all keys and values so far
        (in the cache's dtype)."""
        end = self.length + k.shape[2]
        if end > self.shape[3]:
            raise ValueError(f"KV cache holds {self.shape[3]} positions, asked for {end}")
        if self.k is None:
            self._allocate(k.dtype)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) of x (B, H, T, Dh) by position angles (T, Dh/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def t5_buckets(rel: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucketing of key - query offsets (<= 0): exact near, logarithmic far."""
    n = (-rel).clamp(min=0)
    exact = buckets // 2
    far = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    return torch.where(n < exact, n, far.clamp(max=buckets - 1))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, layer: int, angles, bias, cache: KVCache | None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if angles is not None:  # q, k, v: (B, H, T, Dh)
            q, k = rope(q, *angles), rope(k, *angles)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache of another dtype than autocast's
        mask, causal = None, False
        if bias is not None:
            mask = bias.to(q.dtype)
        elif past == 0:
            causal = t > 1
        elif t > 1:  # queries at past + i see keys up to past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, bias=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, bias=False)
        self.fc = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.out = nn.Linear(cfg.ffn, cfg.dim, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layer, angles, bias, cache):
        x = x + self.drop(self.attn(self.norm1(x), layer, angles, bias, cache))
        return x + self.drop(self.out(F.gelu(self.fc(self.norm2(x)), approximate="tanh")))


class Transformer(nn.Module):
    """Decoder-only transformer with tied input/output embeddings."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("GPTConfig.vocab_size must be set (from the stage layout)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.cond_width:  # the aligned conditioning's own table: a token there means
            self.cond_embed = nn.Embedding(cfg.vocab_size, cfg.dim)  # "condition on", not "came"
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, bias=False)
        head_dim = cfg.dim // cfg.heads
        if cfg.position == "t5":
            self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.heads)
        else:
            inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
            self.register_buffer("inv_freq", inv, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.layers, batch, c.heads, max_len, c.dim // c.heads,
                       device=self.embed.weight.device, dtype=dtype)

    def _positions(self, t: int, past: int, device):
        pos = torch.arange(past, past + t, device=device)
        if self.cfg.position == "rope":
            freqs = pos.float()[:, None] * self.inv_freq[None, :]  # (T, Dh/2)
            return (freqs.cos(), freqs.sin()), None
        keys = torch.arange(past + t, device=device)
        rel = keys[None, :] - pos[:, None]                       # (T, S)
        bias = self.rel_bias(t5_buckets(rel, self.cfg.rel_buckets, self.cfg.rel_max_distance))
        bias = bias.permute(2, 0, 1).unsqueeze(0)                 # (1, H, T, S)
        return None, bias.masked_fill(rel[None, None] > 0, float("-inf"))

    def _inputs(self, idx: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(idx)  # (B, T, D)
        if not self.cfg.cond_width:
            if cond is not None:
                raise ValueError("this model takes no aligned conditioning (cond_width 0)")
            return x
        if cond is None or cond.shape != (*idx.shape, self.cfg.cond_width):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"aligned conditioning must be int64[B, T, {self.cfg.cond_width}] "
                             f"for ids of shape {tuple(idx.shape)}, got {got}")
        keep = (cond >= 0).unsqueeze(-1)                       # -1: no conditioning here
        return x + (self.cond_embed(cond.clamp(min=0)) * keep).sum(-2).to(x.dtype)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """int64[B, T] ids (and their aligned conditioning int64[B, T, C] when the model
        has ``cond_width`` C) -> float[B, T, D] final-normed states (positions follow the
        cache)."""
        past = cache.length if cache is not None else 0
        angles, bias = self._positions(idx.shape[1], past, idx.device)
        x = self.drop(self._inputs(idx, cond))
        for i, block in enumerate(self.blocks):
            x = block(x, i, angles, bias, cache)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                head: bool = True, cond: torch.Tensor | None = None) -> torch.Tensor:
        """int64[B, T] ids -> float[B, T, V] logits over the whole stage vocabulary
        (``head=False``: the hidden states float[B, T, D], for a loss over a few blocks;
        ``cond``: aligned conditioning, see ``hidden``)."""
        h = self.hidden(idx, cache, cond)
        return h @ self.embed.weight.T if head else h

    def head_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Output-head rows of ids [lo, hi): logits of one codebook block are h @ rows.T."""
        return self.embed.weight[lo:hi]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
