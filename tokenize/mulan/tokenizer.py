"""The MuLan token field: audio -> RVQ codes of its MuLan embedding, and its stage command.

Goes in: a MuLan folder and a fitted RVQ folder, and mono float32 audio at
MuLan's rate. Comes out: ``uint16[levels]`` per chunk (the RVQ codes of the
mean of its window embeddings) and the manifest entry naming the model, the
codebooks, the codes each level fitted and the device type. The stage command tokenizes every
audio shard (``cantus.tokenize.run``):

    python -m cantus.tokenize.mulan.tokenizer --params params.yaml --audio data/audio \\
        --mulan models/mulan --mulan-rvq models/mulan_rvq --out data/tokens_mulan
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cantus import shards


class MulanTokens:
    field = "mulan"
    models = ("mulan", "mulan_rvq")

    def __init__(self, models: dict[str, str], device: str = "cpu"):
        from cantus.tokenize.mulan.rvq import MulanTokenizer

        model_dir, rvq_dir = Path(models["mulan"]), Path(models["mulan_rvq"])
        self.tok = MulanTokenizer.load(model_dir, rvq_dir, device=device, text=False)
        self.sample_rate = self.tok.model.cfg.sample_rate
        rvq = json.loads((rvq_dir / "rvq.json").read_text())
        self._desc = {"kind": "mulan-rvq",
                      "checkpoint_hash": shards.sha256(model_dir / "model.safetensors"),
                      "rvq_hash": shards.sha256(rvq_dir / "codebooks.safetensors"),
                      "levels": rvq.get("levels"),
                      "codebook_size": rvq.get("codebook_size", rvq.get("size")),
                      "fitted_per_level": self.tok.rvq.fitted.tolist(),
                      "sample_rate": self.sample_rate,
                      "device": self.tok.model.logit_scale.device.type}  # GPU, CPU may differ

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        return [self.tok(w).astype(np.uint16) for w in wavs]


def main(argv: list[str] | None = None) -> int:
    from cantus.tokenize.run import field_main

    return field_main(MulanTokens, argv)


if __name__ == "__main__":
    sys.exit(main())
