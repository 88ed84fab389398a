"""What every trainer in Cantus shares: checkpoints, RNG state, metrics, weights.

- ``Checkpoints(folder, keep)``: ``save(step, state)`` writes
  ``step-NNNNNNNN.pt`` atomically and keeps the last ``keep``; ``latest()``
  loads the newest with ``torch.load(weights_only=True)`` (no unpickling of
  code). ``state`` is a dict of state dicts (models, optimisers, schedulers),
  the data position, ``rng_state()`` and anything else made of tensors,
  numbers, strings, lists and dicts.
- ``rng_state()`` / ``set_rng_state()``: Python, NumPy and torch (CPU and CUDA)
  generators, so a resumed run draws the same numbers as an uninterrupted one.
- ``save_weights`` / ``load_weights``: a model's weights as safetensors plus
  its config as JSON, the form other stages load by path.
- ``Metrics(folder)``: dvclive logging that survives resume (``dvc plots``).
- ``progress(...)``: a tqdm bar on a terminal, plain log lines otherwise.
- ``warmup_cosine``: the learning-rate factor of every trainer (linear warm-up,
  cosine decay to a floor).
- ``distributed()`` / ``resolve_device()``: rank and world size (1 process
  outside ``torchrun``), and a params ``device`` made concrete; ``barrier()``.
- ``gather_rank_states(state)`` / ``own_rank_state(saved)``: what differs between
  DDP ranks (RNG, data position) gathered into rank 0's checkpoint as a list by
  rank, and each rank's own entry back on resume, so a resumed DDP run draws
  what an uninterrupted one would on every rank.
- ``rank_seed(seed, rank)``: the seed of a rank's own random stream (dropout):
  ``seed`` on rank 0, so one process draws what it always did.
- ``run_id``: what a checkpoint must match to be resumed (params, the stage's
  code, its data).
- ``stage_main``: the command line of a stage (``--params``, ``-v``, one log
  format; a bad config key or a missing input exits 2 naming it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate factor of optimiser step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then a cosine from 1 down to ``floor`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a process group is up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a process group)."""
    import torch.distributed as dist

    if distributed()[1] > 1:
        dist.barrier()


def gather_rank_states(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's ``state`` (plain values and CPU tensors), as a list by rank on rank 0
    and None on the others; ``[state]`` in one process. Every rank must call it."""
    import torch.distributed as dist

    rank, world = distributed()
    if world == 1:
        return [state]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(state, out, dst=0)
    return out


def own_rank_state(ranks: list[dict[str, Any]], where: str = "checkpoint") -> dict[str, Any]:
    """This rank's entry of the per-rank states a checkpoint holds (``gather_rank_states``).

    Raises ValueError when the checkpoint was written by another number of ranks: their
    RNG streams and data shares cannot be mapped onto this run's.
    """
    rank, world = distributed()
    if len(ranks) != world:
        raise ValueError(f"{where} was written by {len(ranks)} rank(s), this run has {world}: "
                         "it cannot resume each rank's RNG and data position (run with "
                         f"{len(ranks)} processes, or remove the checkpoints to start afresh)")
    return ranks[rank]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own stream (dropout masks): ``seed`` on rank 0, a
    different value on each other rank."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def stage_main(prog: str, doc: str, add_arguments, body, argv: list[str] | None = None) -> int:
    """The command line every stage shares.

    ``add_arguments(parser)`` adds the stage's flags (``--params`` and ``-v`` are
    there already); ``body(args)`` does the work and returns the exit status
    (None: 0). A ``ConfigError`` (a bad or missing params key, named) and a
    missing input (``FileNotFoundError``, naming it) exit 2, each with one line
    on stderr naming ``prog``; any other failure exits 1 with its traceback.
    """
    import argparse
    import sys

    from cantus.config import ConfigError

    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return body(args) or 0
    except ConfigError as e:
        print(f"{prog}: configuration error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


def resolve_device(device: str) -> str:
    """A params ``device`` ("cpu", "cuda" or "auto") -> the torch device to use."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    internal, gauss = state["python"]
    random.setstate((3, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """Numbered training checkpoints in one folder, newest ``keep`` kept."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder, self.keep = Path(folder), max(1, keep)

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m[1]) for p in self.folder.iterdir() if (m := _STEP_RE.match(p.name)))

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:08d}.pt"
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save({"step": step, **state}, tmp)
        os.replace(tmp, path)
        for old in self.steps()[:-self.keep]:
            (self.folder / f"step-{old:08d}.pt").unlink(missing_ok=True)
        return path

    def resume(self, run_id: str, clear: bool | None = None) -> dict[str, Any] | None:
        """The latest checkpoint if it was written by run ``run_id``; otherwise None, and
        the stale checkpoints are removed (when ``clear``; by default by rank 0 only).

        Under DDP every rank reads the checkpoint before any removal, and no rank goes
        on before the removal is done (a barrier on each side).
        """
        rank, _ = distributed()
        state = self.latest()
        barrier()  # every rank has read the latest checkpoint (or seen none)
        stale = state is not None and state.get("run_id") != run_id
        if stale:
            log.warning("checkpoints in %s are of other params, code or data: starting afresh",
                        self.folder)
            if clear if clear is not None else rank == 0:
                import shutil

                shutil.rmtree(self.folder, ignore_errors=True)
        barrier()
        return None if stale else state

    def latest(self) -> dict[str, Any] | None:
        steps = self.steps()
        if not steps:
            return None
        path = self.folder / f"step-{steps[-1]:08d}.pt"
        log.info("resuming from %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)


INDEX_FILES = ("manifest.parquet", "index.parquet", "manifest.json")


def run_id(head: str, module: str, paths: list[str]) -> str:
    """What a checkpoint must match to be resumed: ``head`` (params), the code the
    stage's ``module`` imports (``cantus.code_closure``: every project file it
    reaches, so an edit to the loss or the model starts afresh and an edit to a
    README does not), the names and sizes of the data shards, and the bytes of
    their folders' index files (ingest's manifest, the token index and
    manifest), which change with the content even when no shard changes size."""
    import hashlib

    from cantus.code_closure import code_digest

    h = hashlib.sha256(head.encode())
    h.update(code_digest(module).encode())
    from cantus import shards  # paths may be URLs (s3://...): the same id as on disk

    for p in paths:
        h.update(f"{Path(p).name}:{shards.size(p)}".encode())
    for folder in sorted({p.rsplit("/", 1)[0] if shards.is_url(p) else str(Path(p).parent)
                          for p in paths}):
        for name in INDEX_FILES:
            if shards.exists(index := shards.join(folder, name)):
                h.update(name.encode() + shards.read_bytes(index))
    return h.hexdigest()[:16]


def save_weights(model: torch.nn.Module, folder: str | Path, config: Any,
                 extra: dict[str, Any] | None = None) -> str:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (local, or a URL such
    as ``s3://bucket/models/lm_coarse``: the same bytes); returns the weights' sha256."""
    import hashlib

    from safetensors.torch import save, save_file

    from cantus import shards

    if shards.is_url(folder):  # each object appears whole; config.json last
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        data = save(tensors)
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        shards.atomic_write_bytes(shards.join(folder, "model.safetensors"), data)
        shards.atomic_write_bytes(shards.join(folder, "config.json"), (json.dumps(
            {**cfg, **(extra or {})}, indent=2, sort_keys=True) + "\n").encode())
        return hashlib.sha256(data).hexdigest()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".model.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    (folder / "config.json").write_text(json.dumps({**cfg, **(extra or {})}, indent=2,
                                                   sort_keys=True) + "\n")
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def load_weights(model: torch.nn.Module, folder: str | Path, device: str = "cpu",
                 skip: tuple[str, ...] = ()) -> None:
    """Load ``model.safetensors`` from ``folder`` into ``model`` (strict), leaving out the
    weights whose names start with one of ``skip`` (parts ``model`` was built without)."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    state = load_file(str(path), device=device)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(skip)})


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}")
    return json.loads(path.read_text())


class Metrics:
    """dvclive logger; on resume it continues the same curves from ``step``."""

    def __init__(self, folder: str | Path, resume: bool, report: str | None = None):
        from dvclive import Live

        self.live = Live(str(folder), resume=resume, report=report, save_dvc_exp=False,
                         dvcyaml=None)
        self._curves = Path(folder) / "plots" / "metrics" if resume else None

    def log(self, step: int, **metrics: float) -> None:
        if self._curves is not None:  # the first step logged since the resume
            drop_rows_from(self._curves, step)
            self._curves = None
        self.live.step = step
        for k, v in metrics.items():
            self.live.log_metric(k, float(v))
        self.live.next_step()

    def summary(self, **values: float) -> None:
        """Values for the summary (``metrics.json``) that are no curve: times, counts."""
        self.live.summary.update({k: float(v) for k, v in values.items()})

    def image(self, name: str, path: str | Path) -> None:
        self.live.log_image(name, str(path))

    def close(self) -> None:
        self.live.end()


def drop_rows_from(folder: Path, step: int) -> None:
    """Remove the rows of step ``step`` and later from every dvclive curve (``*.tsv``) in
    ``folder``: a killed run logged them after its last checkpoint, and the run resumed
    from that checkpoint logs them again (else the curves would hold those steps twice)."""
    for tsv in sorted(folder.rglob("*.tsv")) if folder.is_dir() else []:
        head, *rows = tsv.read_text().splitlines(keepends=True)
        col = head.rstrip("\n").split("\t").index("step")
        keep = [r for r in rows if int(r.rstrip("\n").split("\t")[col]) < step]
        if len(keep) < len(rows):
            tmp = tsv.with_name(f".{tsv.name}.tmp-{os.getpid()}")
            tmp.write_text(head + "".join(keep))
            os.replace(tmp, tsv)


def progress(total: int, initial: int = 0, desc: str = ""):
    """A tqdm bar on a terminal (disabled otherwise: callers also log periodically)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=None, dynamic_ncols=True)
