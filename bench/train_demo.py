"""The embedded-default check of the LM stages on synthetic demo-shaped tokens.

Goes in: params.yaml section ``lm`` (the demo config). Writes a synthetic token
folder shaped like the demo corpus (48 chunks of 20 s: acoustic [12, 1000],
semantic [500], mulan [12]; K = 1024; ``cantus.train.synthetic``) and trains
the semantic, coarse and fine stages on it with ``cantus.train.run.run``.
Comes out: per stage, validation perplexity beside the unigram baseline,
tokens/s and wall time (and whether ppl < unigram, the target).

    python bench/train_demo.py [--work /tmp/lm_demo] [--stages semantic coarse fine]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from cantus.train.run import Inputs, run
from cantus.train.stage import load_lm
from cantus.train.synthetic import write_synthetic_tokens

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/lm_demo")
    p.add_argument("--stages", nargs="+", default=["semantic", "coarse", "fine"])
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    tokens = write_synthetic_tokens(work / "tokens")
    cfg = load_lm(ROOT / "params.yaml")
    total = time.perf_counter()
    for stage in a.stages:
        start = time.perf_counter()
        s = run(cfg, stage, Inputs(str(tokens), str(work / f"ck_{stage}"),
                                   str(work / f"live_{stage}")), work / f"lm_{stage}")
        verdict = "below" if s["val_ppl"] < s["unigram_ppl"] else "NOT below"
        print(f"{stage:8s} steps {s['steps']}: val ppl {s['val_ppl']:.2f} vs unigram "
              f"{s['unigram_ppl']:.2f} ({verdict}), {s['tokens_per_s']:.0f} tok/s, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    print(f"total {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
