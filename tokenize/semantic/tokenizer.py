"""The semantic token field: audio -> w2v-BERT k-means tokens, and its stage command.

Goes in: the pretraining stage's output (weights, or a manifest naming a
local checkpoint), the fitted k-means codebook and 16 kHz mono float32 audio.
Comes out: ``uint16[T]`` tokens per chunk at the codebook's token rate (25 Hz)
and the manifest entry naming model, layer, centroids and the device type. The stage command
tokenizes every audio shard (``cantus.tokenize.run``):

    python -m cantus.tokenize.semantic.tokenizer --params params.yaml --audio data/audio \\
        --semantic models/semantic --semantic-kmeans models/semantic_kmeans \\
        --out data/tokens_semantic
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


class SemanticTokens:
    field = "semantic"
    models = ("semantic", "semantic_kmeans")

    def __init__(self, models: dict[str, str], device: str = "cpu", batch_size: int = 8):
        from cantus.tokenize.semantic.kmeans import SemanticTokenizer

        self.batch_size = batch_size  # clips per w2v-BERT forward: memory is bounded per shard

        self.tok = SemanticTokenizer(models["semantic"], models["semantic_kmeans"], device=device)
        self.sample_rate = 16000
        m = self.tok.manifest
        self._desc = {"kind": "w2v-bert-kmeans", "checkpoint_hash": m["model_hash"],
                      "layer": m["layer"], "frame_rate": m["token_rate"],
                      "k": m["clusters"], "centroid_hash": m["centroid_hash"],
                      "sample_rate": self.sample_rate,
                      "device": self.tok.extractor.device.type}  # GPU and CPU tokens may differ

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def encode_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(wavs), self.batch_size):
            out += [t.astype(np.uint16) for t in
                    self.tok.encode_batch(wavs[i:i + self.batch_size], self.sample_rate)]
        return out


def main(argv: list[str] | None = None) -> int:
    from cantus.tokenize.run import field_main

    return field_main(SemanticTokens, argv)


if __name__ == "__main__":
    sys.exit(main())
