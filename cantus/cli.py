"""The ``cantus`` command: one subcommand per pipeline step.

    cantus demo   --out data/demo          render the embedded demo corpus
    cantus ingest --source DIR --out DIR   sources -> audio shards
    cantus generate "a fast Irish reel on fiddle" --seconds 10 --out reel.wav

Each subcommand is the ``main`` of a stage module (``python -m
cantus.<stage>.<step>`` runs the same code; dvc.yaml uses that form).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("cantus.ingest.demo", "render the demo corpus from music21 scores"),
    "ingest": ("cantus.ingest.run", "decode, clean, chunk and shard audio sources"),
    "generate": ("cantus.generate.run", "text or an audio prompt -> music (WAV)"),
    "evaluate": ("cantus.evaluate.run", "score generations, gather metrics, write the report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: cantus COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        print("\n'cantus COMMAND --help' shows a command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cantus: unknown command '{name}' (known: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
