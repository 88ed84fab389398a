"""The id of a dataset version: what the LM stages read, in 16 hex digits.

Goes in: a token folder's ``manifest.json`` (the tokenizer identities) and
``index.parquet`` (every chunk key, split, shard and token length; chunk keys
are content hashes of the source audio, offset and length), as bytes. Comes
out: ``sha256`` over both, cut to 16 hex digits. The LM trainer writes it into
its model folder's ``config.json`` (``dataset_version``), ``cantus generate``
prints it, and ``cantus dataset show`` prints it for any git revision, so a
model is traced back to the dataset version, and through it to the sources, it
was trained on. Any change of the audio a chunk holds, of the chunks kept, of
the splits or of a tokenizer changes the id; a caption change alone does not
(the LM stages condition on MuLan tokens of the audio, never on captions).

    python -c "from cantus.dataset_version import of_folder; print(of_folder('data/tokens'))"
"""

from __future__ import annotations

import hashlib

from cantus import shards

FILES = ("manifest.json", "index.parquet")


def dataset_version(manifest: bytes, index: bytes) -> str:
    """The id of the token folder whose ``manifest.json`` and ``index.parquet`` hold these
    bytes (each file hashed on its own, then the pair, so no byte shifts between them)."""
    h = hashlib.sha256(b"cantus dataset version 1\n")
    for name, data in zip(FILES, (manifest, index)):
        h.update(f"{name} {hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def of_folder(folder: str) -> str:
    """The id of a token folder (local or a URL); FileNotFoundError naming a missing file."""
    blobs = []
    for name in FILES:
        path = shards.join(folder, name)
        if not shards.exists(path):
            raise FileNotFoundError(f"{folder}: no {name} (not a token folder?)")
        blobs.append(shards.read_bytes(path))
    return dataset_version(*blobs)
