"""A synthetic token folder with learnable structure, for tests and the demo check.

Goes in: a size (chunks, seconds, K). Comes out: a token folder in the exact
``cantus.tokens`` contract, written with the real writer (``train-*.tar``,
``valid-*.tar``, ``index.parquet``, ``manifest.json``). Each chunk has a
"genre" (its MuLan tokens); its semantic tokens walk a genre-specific Markov
chain over a few states, each held 1-4 frames; acoustic level 0 follows the
semantic state and the frame parity, level l mostly follows level l - 1. So
every stage has context to learn and a unigram model does measurably worse.

    python -m cantus.train.synthetic --out data/tokens_synthetic   # 48 chunks of 20 s
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cantus import shards
from cantus.tokens import ACOUSTIC_HZ, SEMANTIC_HZ, sample_fields

MANIFEST = {"acoustic": {"kind": "synthetic", "frame_rate": 50.0, "n_q": 12},
            "semantic": {"kind": "synthetic", "frame_rate": 25},
            "mulan": {"kind": "synthetic", "levels": 12}}


def chunk_tokens(rng: np.random.Generator, tables: dict, genre: int, seconds: float
                 ) -> dict[str, np.ndarray]:
    k, states = tables["k"], tables["succ"].shape[1]
    n_sem = int(round(seconds * SEMANTIC_HZ))
    seq, s = [], int(rng.integers(states))
    while len(seq) < n_sem:
        seq += [s] * int(rng.integers(1, 5))
        s = int(tables["succ"][genre, s, rng.integers(2)])
    state = np.array(seq[:n_sem])
    n_ac = 2 * n_sem if ACOUSTIC_HZ == 2 * SEMANTIC_HZ else int(round(seconds * ACOUSTIC_HZ))
    frame = np.arange(n_ac)
    acoustic = np.zeros((12, n_ac), np.int64)
    acoustic[0] = tables["level0"][state[frame // 2] * 2 + frame % 2]
    for lvl in range(1, 12):
        follow = tables["levels"][lvl][acoustic[lvl - 1]]
        noise = rng.integers(0, k, n_ac)
        acoustic[lvl] = np.where(rng.random(n_ac) < 0.9, follow, noise)
    return {"acoustic": acoustic.astype(np.uint16),
            "semantic": tables["sem_ids"][state].astype(np.uint16),
            "mulan": tables["mulan"][genre].astype(np.uint16)}


def write_synthetic_tokens(folder: str | Path, chunks: int = 48, seconds: float = 20.0,
                           k: int = 1024, valid: int = 6, shards_train: int = 3,
                           genres: int = 4, states: int = 64, seed: int = 0) -> Path:
    """Write the folder; returns it. ``valid`` chunks go to one valid shard."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    tables = {"k": k, "succ": rng.integers(0, states, (genres, states, 2)),
              "sem_ids": rng.permutation(k)[:states],
              "level0": rng.integers(0, k, 2 * states),
              "levels": [None] + [rng.integers(0, k, k) for _ in range(11)],
              "mulan": rng.integers(0, k, (genres, 12))}
    samples = []
    for i in range(chunks):
        genre = i % genres
        toks = chunk_tokens(rng, tables, genre, seconds)
        samples.append((f"chunk{i:05d}", toks, {"caption": f"synthetic genre {genre}",
                                                "duration": seconds}))
    train, held = samples[:chunks - valid], samples[chunks - valid:]
    rows = []
    groups = [(f"train-{j:06d}.tar", train[j::shards_train]) for j in range(shards_train)]
    groups.append(("valid-000000.tar", held))
    for name, group in groups:
        shards.write_shard(folder / name, [(key, sample_fields(t, m)) for key, t, m in group])
        rows += [{"key": key, "split": name.split("-")[0], "shard": name,
                  "acoustic_frames": t["acoustic"].shape[1],
                  "semantic_frames": t["semantic"].shape[0]} for key, t, _ in group]
    import pyarrow as pa

    shards.write_parquet(folder / "index.parquet", pa.Table.from_pylist(rows))
    manifest = {f: {**v, **({"codebook_size": k} if f != "semantic" else {"k": k})}
                for f, v in MANIFEST.items()}
    shards.atomic_write_json(folder / "manifest.json", {"tokenizers": manifest})
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write a synthetic token folder")
    p.add_argument("--out", required=True)
    p.add_argument("--chunks", type=int, default=48)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_synthetic_tokens(a.out, a.chunks, a.seconds, seed=a.seed))


if __name__ == "__main__":
    main()
