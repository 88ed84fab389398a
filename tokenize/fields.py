"""The three token fields by name, for code that picks one at run time.

Each field's tokenizer lives in its sub-package (``codec.tokenizer``,
``semantic.tokenizer``, ``mulan.tokenizer``) behind one small interface:

- ``field``: "acoustic", "semantic" or "mulan"; ``models``: the model folders
  it is built from, as ``Class({"codec": dir, ...}, device)``;
- ``sample_rate``: the rate its input audio must have (decode resamples to it);
- ``describe()``: the manifest entry naming the exact tokenizer (hashes,
  layer, rates, hops, codebook sizes), which a trainer checks;
- ``encode_batch(wavs) -> list of uint16 arrays``: ``[12, T]`` at 50 Hz,
  ``[T]`` at 25 Hz, or ``[12]`` per chunk.

``load_field(field, models)`` builds one by name. Importing this module
imports all three tokenizers (and their model code), so the pipeline stages
import their own field's module instead; this one serves tests, benches and
tools that handle every field.
"""

from __future__ import annotations

from cantus.tokenize.codec.tokenizer import AcousticTokens
from cantus.tokenize.mulan.tokenizer import MulanTokens
from cantus.tokenize.run import open_tokenizer
from cantus.tokenize.semantic.tokenizer import SemanticTokens

FIELDS = {cls.field: cls for cls in (AcousticTokens, SemanticTokens, MulanTokens)}
FIELD_MODELS = {name: cls.models for name, cls in FIELDS.items()}


def load_field(field: str, models: dict[str, str], device: str = "cpu"):
    """The tokenizer of ``field`` from model folders named as in FIELD_MODELS."""
    if field not in FIELDS:
        raise ValueError(f"unknown token field {field!r} (known: {', '.join(FIELDS)})")
    return open_tokenizer(FIELDS[field], models, device)
