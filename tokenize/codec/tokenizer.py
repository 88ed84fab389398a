"""The acoustic token field: audio -> SoundStream codes, and its stage command.

Goes in: a codec folder (``model.safetensors`` + ``config.json``) and mono
float32 audio at the codec's rate. Comes out: ``uint16[n_q, T]`` codes per
chunk at 50 Hz (``encode_batch``) and the manifest entry naming the codec and the device
type it ran on (``describe``). The stage command tokenizes every audio shard
(``cantus.tokenize.run``):

    python -m cantus.tokenize.codec.tokenizer --params params.yaml \\
        --audio data/audio --codec models/codec --out data/tokens_acoustic
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from cantus import shards


class AcousticTokens:
    field = "acoustic"
    models = ("codec",)      # model folders it is built from (--codec)

    def __init__(self, models: dict[str, str], device: str = "cpu", batch_size: int = 8):
        from cantus.tokenize.codec.model import SoundStream

        folder = Path(models["codec"])
        self.model = SoundStream.load(folder, device=device)
        self.sample_rate = self.model.cfg.sample_rate
        self.batch_size = batch_size
        self._desc = {"kind": "soundstream",
                      "checkpoint_hash": shards.sha256(folder / "model.safetensors"),
                      "sample_rate": self.sample_rate, "hop": self.model.cfg.hop,
                      "frame_rate": self.sample_rate / self.model.cfg.hop,
                      "n_q": self.model.cfg.n_q, "codebook_size": self.model.cfg.codebook_size,
                      "device": self.model._device().type}  # GPU and CPU codes may differ

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        hop, out = self.model.cfg.hop, []
        for i in range(0, len(wavs), self.batch_size):
            group = wavs[i:i + self.batch_size]
            n = max(w.shape[0] for w in group)
            x = torch.zeros(len(group), n)
            for j, w in enumerate(group):
                x[j, : w.shape[0]] = torch.from_numpy(w)
            # The encoder is causal, so padding at the end leaves earlier frames as they are.
            codes = self.model.encode(x, sample_rate=self.sample_rate).cpu().numpy()
            out += [codes[j, :, : -(-w.shape[0] // hop)].astype(np.uint16)
                    for j, w in enumerate(group)]
        return out


def main(argv: list[str] | None = None) -> int:
    from cantus.tokenize.run import field_main

    return field_main(AcousticTokens, argv)


if __name__ == "__main__":
    sys.exit(main())
