"""Audio embeddings for FAD: our MuLan audio tower, or a local checkpoint by path.

Goes in: mono float32 audio at any rate. Comes out: one float32[D] vector
per clip. ``load_embedder(spec, mulan)`` takes

- ``"mulan"``: the trained MuLan audio tower (10 s windows averaged), the default;
- a folder holding ``model.pt``, a TorchScript module mapping float32[1, N]
  audio to [D] or [frames, D] (frames are averaged), and ``config.json`` with
  its ``sample_rate`` (e.g. a VGGish exported with ``torch.jit.script``).
  Weights are never unpickled as Python objects: TorchScript only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cantus.audio import resample


class Embedder(Protocol):
    name: str
    sample_rate: int

    def __call__(self, audio: np.ndarray) -> np.ndarray: ...


class MulanEmbedder:
    def __init__(self, mulan):
        self.model, self.name = mulan, "mulan"
        self.sample_rate = mulan.cfg.sample_rate

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(audio, np.float32))
        return self.model.embed_long(x).cpu().numpy()  # the tower may sit on a GPU


class ScriptedEmbedder:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        for f in ("model.pt", "config.json"):
            if not (folder / f).is_file():
                raise FileNotFoundError(f"FAD embedding folder {folder} lacks {f} (needs a "
                                        "TorchScript model.pt and config.json with sample_rate)")
        cfg = json.loads((folder / "config.json").read_text())
        if "sample_rate" not in cfg:
            raise ValueError(f"{folder / 'config.json'} must give the model's sample_rate")
        self.sample_rate, self.name = int(cfg["sample_rate"]), cfg.get("name", folder.name)
        self.model = torch.jit.load(str(folder / "model.pt"), map_location="cpu").eval()

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(np.asarray(audio, np.float32))[None])
        out = out.reshape(-1, out.shape[-1]).float().mean(0)
        return out.cpu().numpy()


def load_embedder(spec: str, mulan=None) -> Embedder:
    if spec == "mulan":
        if mulan is None:
            raise ValueError("the 'mulan' FAD embedding needs the trained MuLan model")
        return MulanEmbedder(mulan)
    return ScriptedEmbedder(spec)


def embed_all(embedder: Embedder, clips: list[np.ndarray], rate: int) -> np.ndarray:
    """float32[N, D] for clips at ``rate`` (resampled to the embedder's rate)."""
    return np.stack([embedder(resample(np.asarray(c, np.float32), rate, embedder.sample_rate)
                              if rate != embedder.sample_rate else c) for c in clips])
