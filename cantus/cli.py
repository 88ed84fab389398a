"""The ``cantus`` command: one subcommand per pipeline step.

    cantus demo --out data/demo                      render the embedded demo corpus
    cantus ingest --source DIR --out DIR             sources -> audio shards
    cantus add-source ~/music                        a folder -> data/sources/music (DVC)
    cantus tokenize acoustic --audio ... --codec ... audio shards -> one field's tokens
    cantus train --stage coarse --tokens ...         train one LM stage
    cantus generate "a fast Irish reel on fiddle" --seconds 10 --out reel.wav
    cantus dataset diff v1 v2                        tracks added/removed between revisions

Goes in: ``argv`` (a command of one or two words, then its options). Each
command is the ``main(argv)`` of a stage module, so ``python -m
cantus.<stage>.<step>`` (the form dvc.yaml uses) runs the same code. Comes
out: that main's exit status: 0 done, 2 a bad input or config (one line on
stderr naming the flag, path or params key), 1 a failure of the work itself.
"""

from __future__ import annotations

import importlib
import sys

# command words -> (module whose main() runs it, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cantus.ingest.demo", "render the demo corpus from music21 scores"),
    "ingest": ("cantus.ingest.run", "decode, clean, chunk and shard audio sources"),
    "add-source": ("cantus.ingest.add_source",
                   "bring a folder or list outside the repo under DVC as a source"),
    "codec train": ("cantus.tokenize.codec.train", "train the SoundStream codec"),
    "codec eval": ("cantus.tokenize.codec.evaluate", "score the codec beside Opus"),
    "semantic pretrain": ("cantus.tokenize.semantic.pretrain", "pretrain w2v-BERT"),
    "semantic kmeans": ("cantus.tokenize.semantic.kmeans", "fit the semantic k-means codebook"),
    "semantic eval": ("cantus.tokenize.semantic.evaluate", "score the semantic tokens (PNMI)"),
    "mulan train": ("cantus.tokenize.mulan.train", "train MuLan (audio and text towers)"),
    "mulan rvq": ("cantus.tokenize.mulan.rvq", "fit MuLan's residual k-means"),
    "mulan eval": ("cantus.tokenize.mulan.evaluate", "score MuLan retrieval and zero-shot tags"),
    "tokenize acoustic": ("cantus.tokenize.codec.tokenizer", "audio shards -> codec tokens"),
    "tokenize semantic": ("cantus.tokenize.semantic.tokenizer",
                          "audio shards -> w2v-BERT k-means tokens"),
    "tokenize mulan": ("cantus.tokenize.mulan.tokenizer", "audio shards -> MuLan RVQ tokens"),
    "pack": ("cantus.tokenize.pack", "join the three token fields into training shards"),
    "train": ("cantus.train.run", "train one LM stage (--stage semantic|coarse|fine)"),
    "generate": ("cantus.generate.run", "text or an audio prompt -> music (WAV)"),
    "generate-eval": ("cantus.evaluate.generate_eval", "generate the evaluation set"),
    "evaluate": ("cantus.evaluate.run", "score generations, gather metrics, write the report"),
    "dataset": ("cantus.dataset", "a dataset version: show [--rev], diff REV_A REV_B, card"),
}
GROUPS = sorted({name.split()[0] for name in COMMANDS if " " in name})


def usage(group: str | None = None) -> str:
    """The command list (of one group, e.g. ``tokenize``, or of all) as help text."""
    names = [n for n in COMMANDS if group is None or n.split()[0] == group]
    lines = [f"usage: cantus {f'{group} SUBCOMMAND' if group else 'COMMAND'} [options]", "",
             "commands:"]
    lines += [f"  {name:<19} {COMMANDS[name][1]}" for name in names]
    lines += ["", "'cantus COMMAND --help' shows a command's options.",
              "exit status: 0 done, 2 bad input or config, 1 failure."]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """``argv`` -> (command name, the rest); ValueError naming an unknown or incomplete one."""
    words = [argv[0].replace("_", "-")]
    if len(argv) > 1 and f"{words[0]} {argv[1]}" in COMMANDS:
        return f"{words[0]} {argv[1]}", argv[2:]
    if words[0] in COMMANDS:
        return words[0], argv[1:]
    if words[0] in GROUPS:
        subs = ", ".join(n.split()[1] for n in COMMANDS if n.split()[0] == words[0])
        got = f"unknown '{argv[1]}'" if len(argv) > 1 and not argv[1].startswith("-") else "missing"
        raise ValueError(f"cantus {words[0]}: {got} subcommand (known: {subs})")
    raise ValueError(f"cantus: unknown command '{argv[0]}' "
                     f"(known: {', '.join(sorted({n.split()[0] for n in COMMANDS}))})")


def main(argv: list[str] | None = None) -> int:
    """Run ``cantus COMMAND ...``; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in GROUPS and argv[1:2] in (["-h"], ["--help"]):
        print(usage(argv[0]))
        return 0
    try:
        name, rest = resolve(argv)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest) or 0
    if name == "dataset":
        end_now(code)
    return code


def end_now(code: int) -> None:
    """Flush and end the process at once, skipping the interpreter's teardown.

    After reading revisions through ``dvc.api.DVCFileSystem`` (remote fetches,
    thread pools of dvc and fsspec), the teardown at exit sometimes aborts
    (``terminate called without an active exception``, SIGABRT) after the
    command has done its work and printed it; a command line must not then
    report failure.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
