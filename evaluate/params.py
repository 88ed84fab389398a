"""Section ``evaluate`` of params.yaml: which prompts are generated and how they are scored."""

from __future__ import annotations

from dataclasses import dataclass

from cantus.config import ConfigError


@dataclass(frozen=True)
class EvaluateConfig:
    seconds: float              # length of each generation and of each real reference crop
    max_captions: int           # valid-split captions used as prompts (all when fewer)
    instrument_prompt: str      # adherence prompts: one per instrument of the corpus
    min_instrument_count: int   # instruments with fewer chunks than this get no prompt
    examples: int               # prompts shown with players and spectrograms in the report
    fad_embedding: str          # "mulan", or a folder with a TorchScript model.pt + config.json
    seed: int
    diagnostic_clips: int = 16  # valid token clips the LM conditioning sensitivity scores

    def __post_init__(self):
        if not self.seconds > 0:
            raise ConfigError("'evaluate.seconds' must be positive")
        if "{}" not in self.instrument_prompt:
            raise ConfigError("'evaluate.instrument_prompt' must contain {} for the instrument")
        if self.max_captions < 0 or self.examples < 0 or self.min_instrument_count < 1:
            raise ConfigError("'evaluate.max_captions', 'examples' must be >= 0 and "
                              "'min_instrument_count' >= 1")
