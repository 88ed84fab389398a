"""Tokenize stage: audio shards -> one set of token shards for one field.

Goes in: the ingest stage's audio shards, one field's tokenizer class (the
``tokenizer`` module of ``codec/``, ``semantic/`` or ``mulan/``: ``field``,
``models``, ``sample_rate``, ``describe()``, ``encode_batch(wavs)``), its
model folder(s) (``--codec``; ``--semantic`` and ``--semantic-kmeans``;
``--mulan`` and ``--mulan-rvq``) and the ``tokenize`` section of params.yaml. Comes out, in
``--out``: one token shard per audio shard, with the same name and keys
(``{key}.{field}.npy``), a sidecar ``{shard}.json`` per shard (keys, token
lengths, rejects), ``index.parquet``, ``rejects.parquet`` and ``manifest.json``
naming the tokenizer. ``cantus.tokenize.pack`` joins the fields.

    python -m cantus.tokenize.codec.tokenizer --params params.yaml \\
        --audio data/audio --codec models/codec --out data/tokens_acoustic

Each field's command is its tokenizer module's ``main``, so a stage imports
only its own model code. This module imports none of them.

Ray: each audio shard is decoded and resampled by a CPU task, and tokenized
by a model actor (loaded once per actor; ``num_gpus`` per actor from params),
with at most ``max_in_flight`` shards outstanding so memory stays bounded.
A shard's output depends only on that shard and the model and is written
atomically, so a killed run resumes by skipping finished shards. A finished
shard is kept only if its sidecar names the sha256 of the audio shard it is
for now (a changed input is tokenized again), and shards of audio shards no
longer planned are removed. An actor whose process dies is restarted and its
task retried.

Devices: an actor's device follows ``gpus_per_actor``: 0 gives CPU actors
(their CUDA devices hidden, so none touches a GPU Ray does not count), more
gives CUDA actors on the GPU(s) Ray assigned; ``device: auto`` is resolved
per actor from that assignment. With GPUs, the actor count is capped by the
cluster's GPUs (more would wait forever for a GPU). GPU tokenizers run with
deterministic kernels where torch has them, TF32 off, and the device type is
part of the manifest entry, so a resume on another device type rewrites.
A chunk a tokenizer cannot handle is a reject, but a CUDA error (out of
memory, a device-side assert) stops the actor; more rejects than
``max_reject_fraction`` of the chunks fails the stage (``TooManyRejects``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cantus import shards
from cantus.config import ConfigError, load_section
from cantus.tokens import npy_bytes

log = logging.getLogger(__name__)


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"'tokenize.{key}' {why}")


@dataclass(frozen=True)
class TokenizeConfig:
    executor: str          # "ray" or "local"
    actors: int            # model actors per field (0 = as many as the CPUs allow)
    cpus_per_actor: float  # Ray CPUs each actor holds
    gpus_per_actor: float  # Ray GPUs each actor holds (0 on CPU machines)
    max_in_flight: int     # shards outstanding at once (0 = 2 per actor)
    device: str            # "cpu", "cuda" or "auto"
    max_reject_fraction: float  # more rejects than this fraction of the chunks fails the stage

    def __post_init__(self):
        _require(self.executor in ("ray", "local"), "executor", "must be 'ray' or 'local'")
        _require(self.actors >= 0, "actors", "must be >= 0")
        _require(self.cpus_per_actor > 0, "cpus_per_actor", "must be positive")
        _require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0")
        _require(self.max_in_flight >= 0, "max_in_flight", "must be >= 0")
        _require(self.device in ("cpu", "cuda", "auto"), "device", "must be cpu, cuda or auto")
        _require(0 <= self.max_reject_fraction < 1, "max_reject_fraction",
                 "must be in [0, 1): a stage that rejects every chunk must fail")
        if self.executor == "ray":
            _require(not (self.device == "cuda" and self.gpus_per_actor == 0), "device",
                     "is 'cuda' but gpus_per_actor is 0: an actor holding no Ray GPU would use "
                     "a GPU Ray does not count (set gpus_per_actor > 0, or device auto/cpu)")
            _require(not (self.device == "cpu" and self.gpus_per_actor > 0), "gpus_per_actor",
                     f"is {self.gpus_per_actor} but device is 'cpu': the actors would hold GPUs "
                     "they never use (set device auto or cuda)")


class TooManyRejects(RuntimeError):
    """A tokenize stage rejected more chunks than ``tokenize.max_reject_fraction`` allows."""


def actor_device(device: str, gpus_per_actor: float, gpu_ids: list) -> str:
    """The torch device of a Ray model actor: ``device`` (params) made concrete from the
    GPUs the actor holds (``gpus_per_actor``) and the ids Ray assigned it (``gpu_ids``).

    0 GPUs -> "cpu" (whatever ``device`` says, "cuda" being refused by the config);
    > 0 -> "cuda", the device Ray made visible as cuda:0 (``CUDA_VISIBLE_DEVICES``).
    """
    if gpus_per_actor <= 0:
        if device == "cuda":
            raise ValueError("tokenize.device 'cuda' with gpus_per_actor 0: the actor holds "
                             "no Ray GPU")
        return "cpu"
    if device == "cpu":
        raise ValueError(f"tokenize.device 'cpu' with gpus_per_actor {gpus_per_actor}")
    if not gpu_ids:
        raise RuntimeError(f"a model actor with gpus_per_actor {gpus_per_actor} was assigned "
                           "no GPU by Ray")
    return "cuda"


def actor_count(cfg: TokenizeConfig, cpus: float, gpus: float) -> int:
    """Model actors per field for a cluster of ``cpus`` CPUs and ``gpus`` GPUs (Ray's
    counts): ``cfg.actors``, or for 0 as many as the CPUs allow,
    capped by the GPUs when actors hold GPUs. Raises ConfigError when the actors could
    never all start (they would wait forever for resources) or none fits."""
    by_cpu = max(1, int(round(cpus / cfg.cpus_per_actor, 6)))
    n = cfg.actors or by_cpu
    if cfg.gpus_per_actor > 0:
        by_gpu = int(round(gpus / cfg.gpus_per_actor, 6))  # 0.5 per actor: 2 per GPU
        if by_gpu == 0:
            raise ConfigError(f"'tokenize.gpus_per_actor' {cfg.gpus_per_actor}: the Ray cluster "
                              f"has {gpus:g} GPUs, not enough for one actor (set 0 for CPU "
                              "actors)")
        if cfg.actors and cfg.actors > by_gpu:
            raise ConfigError(f"'tokenize.actors' {cfg.actors} x gpus_per_actor "
                              f"{cfg.gpus_per_actor} exceeds the {gpus:g} GPUs Ray has: the "
                              "extra actors would never start")
        n = min(n, by_gpu)
    if n * cfg.cpus_per_actor > cpus + 1e-6:
        raise ConfigError(f"'tokenize.actors' {n} x cpus_per_actor {cfg.cpus_per_actor} "
                          f"exceeds the {cpus:g} CPUs Ray has: the extra actors would never "
                          "start")
    return n


def deterministic_cuda() -> None:
    """Ask torch for reproducible CUDA results: deterministic algorithms where they exist
    (warning, not failing, where they do not), cuDNN deterministic and not benchmarking,
    TF32 off for matrix products and convolutions."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def device_error(e: BaseException) -> bool:
    """Whether ``e`` says the device itself failed (CUDA out of memory, a device-side
    assert, a cuDNN/cuBLAS error): the CUDA context may be corrupt, so every later chunk
    would fail too; such an error must stop the actor, not become a reject."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(w in msg for w in ("CUDA", "cuDNN", "CUBLAS",
                                                                  "cuBLAS"))


GROUP = 8  # chunks decoded and encoded together: an actor never holds a whole shard's audio


def decoded_groups(path: str, sample_rate: int, size: int):
    """``(shard, groups)``: an iterator of the audio shard's decoded chunks at
    ``sample_rate``, ``size`` at a time, as ``(keys, wavs, rejects)``, and the
    ``shards.HashedSamples`` it streams, whose ``sha256`` (the shard's identity) is set
    once ``groups`` is exhausted. Undecodable samples are rejects, not a stop. The shard
    is read once, as a stream: only one group of decoded chunks is in memory at a time,
    never the shard's bytes."""
    from cantus.audio import decode_sample, resample  # deferred, like their own imports

    shard = shards.HashedSamples(path)

    def groups():
        keys, wavs, rejects = [], [], []
        for key, fields in shard:
            try:
                x, meta = decode_sample(fields)
                wavs.append(resample(x, int(meta["sample_rate"]), sample_rate))
                keys.append(key)
            except Exception as e:  # a damaged sample must not stop the shard
                rejects.append({"key": key, "reason": "decode_error", "detail": f"{path}: {e}"})
            if len(wavs) == size:
                yield keys, wavs, rejects
                keys, wavs, rejects = [], [], []
        if keys or rejects:
            yield keys, wavs, rejects

    return shard, groups()


def decode_shard(path: str, sample_rate: int) -> dict[str, Any]:
    """One audio shard's chunks at ``sample_rate``, all at once (for benches on a few shards;
    the tokenize stage goes through ``decoded_groups``)."""
    shard, groups = decoded_groups(path, sample_rate, GROUP)
    out = {"path": path, "keys": [], "wavs": [], "rejects": []}
    for keys, wavs, rejects in groups:
        out["keys"] += keys
        out["wavs"] += wavs
        out["rejects"] += rejects
    return out | {"input_sha256": shard.sha256}


class ShardTokenizer:
    """Holds one field's model; ``run`` tokenizes one decoded shard and writes it."""

    def __init__(self, tokenizer: type, models: dict[str, str], device: str, threads: int = 0,
                 ray_gpus: float | None = None):
        """``ray_gpus``: in a Ray actor, the GPUs it holds (the device follows them);
        None in-process, where ``device`` ("auto": CUDA when present) decides."""
        if ray_gpus is not None:
            import ray

            device = actor_device(device, ray_gpus, ray.get_gpu_ids())
            if device == "cpu":  # Ray leaves a GPU-less actor's devices visible: hide them
                os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if threads:
            import torch

            torch.set_num_threads(threads)  # one actor per CPU must not oversubscribe it
        from cantus.training import resolve_device

        device = resolve_device(device)
        if str(device).startswith("cuda"):
            deterministic_cuda()
        if str(device).startswith("cpu"):
            from cantus.memory import keep_freed_memory

            keep_freed_memory(every_size=True)  # same-sized shards: reuse every block
        self.tok = open_tokenizer(tokenizer, models, device)
        self.field = tokenizer.field

    def encode(self, keys: list[str], wavs: list, path: str) -> tuple[list, list]:
        """``(pairs, rejects)`` for one group of decoded chunks of the shard at ``path``:
        ``(key, tokens)`` for each chunk the tokenizer takes, a reject for each it cannot."""
        try:
            return list(zip(keys, self.tok.encode_batch(wavs))), []
        except Exception as e:  # find the chunk(s) at fault, one by one
            if device_error(e):
                raise
        pairs, rejects = [], []
        for key, w in zip(keys, wavs):
            try:
                pairs.append((key, self.tok.encode_batch([w])[0]))
            except Exception as e:
                if device_error(e):
                    raise
                rejects.append({"key": key, "reason": f"{self.field}_error",
                                "detail": f"{path}: {type(e).__name__}: {e}"})
        return pairs, rejects

    def run(self, path: str, out_path: str) -> dict[str, Any]:
        """Tokenize the audio shard at ``path`` into ``out_path``, ``GROUP`` chunks at a
        time: the actor holds one group's audio and the shard's tokens, never its audio
        (decoded or not)."""
        pairs, rejects, samples = [], [], 0
        shard, groups = decoded_groups(path, self.tok.sample_rate, GROUP)
        for group_keys, wavs, group_rejects in groups:
            encoded, bad = self.encode(group_keys, wavs, path) if wavs else ([], [])
            lengths = dict(zip(group_keys, map(len, wavs)))
            samples += sum(lengths[k] for k, _ in encoded)
            pairs += encoded
            rejects += group_rejects + bad
        keys, tokens = [k for k, _ in pairs], [t for _, t in pairs]
        summary = {"shard": Path(out_path).name, "keys": keys,
                   "lengths": [int(t.shape[-1]) for t in tokens], "rejects": rejects,
                   "input_sha256": shard.sha256}  # the audio shard it was made from
        # The sidecar first: a shard that exists always has its sidecar.
        shards.atomic_write_json(_sidecar(out_path), summary)
        shards.write_shard(out_path, [(k, {f"{self.field}.npy": npy_bytes(t)})
                                      for k, t in zip(keys, tokens)])
        # the audio this shard tokenized, for the stage's real-time factor (not in the sidecar)
        return {**summary, "audio_s": samples / self.tok.sample_rate}

    def info(self) -> tuple[dict[str, Any], int, str]:
        """(manifest entry, input sample rate, Ray node id or "local")."""
        node = "local"
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return self.tok.describe(), self.tok.sample_rate, node


def open_tokenizer(tokenizer: type, models: dict[str, str], device: str = "cpu"):
    """``tokenizer(models, device)`` once every model folder it needs is there; a folder at
    a URL (``s3://...``) is fetched into this node's cache first (``cantus.model_cache``)."""
    from cantus.model_cache import local_folder

    missing = [m for m in tokenizer.models if not models.get(m)]
    if missing:
        raise ValueError(f"field {tokenizer.field!r} needs model folder(s): "
                         + ", ".join(f"--{m.replace('_', '-')}" for m in missing))
    local = {}
    for name in tokenizer.models:
        try:
            local[name] = local_folder(models[name])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name} model folder not found: {e}") from None
        if not Path(local[name]).is_dir():
            raise FileNotFoundError(f"{name} model folder not found: {models[name]}")
    return tokenizer(local, device)


def _sidecar(out_path: str) -> str:
    return out_path[: -len(".tar")] + ".json"


def _done(out_path: str, audio_path: str) -> dict[str, Any] | None:
    """The sidecar of a finished token shard made from this very audio shard, else None."""
    if not (shards.exists(out_path) and shards.exists(_sidecar(out_path))):
        return None
    summary = shards.read_json(_sidecar(out_path))
    if summary.get("input_sha256") != shards.sha256(audio_path):
        log.warning("%s was made from other audio than %s: tokenizing it again", out_path,
                    audio_path)
        return None
    return summary


def _prepare_out(out: str, description: dict[str, Any]) -> None:
    """Start over when ``out`` (local or a URL) holds tokens of another tokenizer."""
    manifest = shards.join(out, "manifest.json")
    if shards.exists(manifest) and shards.read_json(manifest).get("tokenizer") != description:
        log.warning("%s holds tokens of another tokenizer: rewriting every shard", out)
        for p in shards.glob(out, "*"):
            if Path(p).suffix in (".tar", ".json", ".parquet"):
                shards.remove(p)
    shards.makedirs(out)


def _schedule_local(tokenizer: ShardTokenizer, jobs: list[tuple[str, str]]):
    for path, out_path in jobs:
        yield tokenizer.run(path, out_path)


class ActorPool:
    """The model actors of one field (Ray); the driver itself loads no model."""

    def __init__(self, tokenizer: type, models: dict[str, str], cfg: TokenizeConfig):
        import ray

        from cantus.parallel import worker_count

        total = worker_count(0)
        # Actors hold their CPUs (and GPUs) for life: leave room for at least one decode
        # task, and start no more GPU actors than the cluster has GPUs for.
        n = actor_count(cfg, total, float(ray.cluster_resources().get("GPU", 0)))
        actor_cls = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
                               max_restarts=3, max_task_retries=3)(ShardTokenizer)
        threads = max(1, int(round(cfg.cpus_per_actor)))
        self.actors = [actor_cls.remote(tokenizer, models, cfg.device, threads,
                                        cfg.gpus_per_actor) for _ in range(n)]
        self.cfg = cfg
        infos = ray.get([a.info.remote() for a in self.actors])
        self.description = infos[0][0]
        self.nodes = [i[2] for i in infos]
        log.info("%d %s actors on %d Ray node(s)", n, tokenizer.field, len(set(self.nodes)))

    def schedule(self, jobs: list[tuple[str, str]]):
        """Shard paths go to the actors (each reads and decodes its own, a group at a time),
        ``max_in_flight`` shards outstanding."""
        import ray

        n = len(self.actors)
        window = self.cfg.max_in_flight or 2 * n
        pending, it = {}, iter(enumerate(jobs))
        while True:
            while len(pending) < window:
                nxt = next(it, None)
                if nxt is None:
                    break
                i, (path, out_path) = nxt
                ref = self.actors[i % n].run.remote(path, out_path)
                pending[ref] = i % n
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            yield ray.get(done[0]), self.nodes[actor]


def run(cfg: TokenizeConfig, tokenizer: type, audio_dir: str | Path, models: dict[str, str],
        out: str | Path) -> dict[str, Any]:
    """Tokenize every audio shard with ``tokenizer`` (a field's class); returns a summary."""
    import time

    from cantus.training import progress

    t0 = time.perf_counter()
    field, out = tokenizer.field, str(out)  # a local folder or a URL (s3://...)
    paths = [p for split in ("train", "valid") for p in _shards_or_none(audio_dir, split)]
    if not paths:
        raise FileNotFoundError(f"{audio_dir}: no audio shards (train-*.tar / valid-*.tar)")
    if cfg.executor == "local":
        local = ShardTokenizer(tokenizer, models, cfg.device)
        description = local.info()[0]
    else:
        pool = ActorPool(tokenizer, models, cfg)
        description = pool.description
    _prepare_out(out, description)
    shards.remove_unplanned(out, [Path(p).name for p in paths])
    summaries, jobs = {}, []
    for p in paths:
        target = shards.join(out, Path(p).name)
        if (done := _done(target, p)) is not None:
            summaries[Path(p).name] = done
        else:
            jobs.append((p, target))
    skipped = len(summaries)
    ready = time.perf_counter()
    sched = (((s, "local") for s in _schedule_local(local, jobs))
             if cfg.executor == "local" else pool.schedule(jobs))
    nodes: dict[str, int] = {}
    audio_s = 0.0  # seconds of audio tokenized by this run (finished shards skipped)
    with progress(len(jobs), desc=f"tokenize {field}") as bar:
        for s, node in sched:
            summaries[s["shard"]] = s
            nodes[node] = nodes.get(node, 0) + 1
            audio_s += s.pop("audio_s", 0.0)
            bar.update(1)
    done = time.perf_counter()
    summary = _write_tables(out, field, description, [summaries[Path(p).name] for p in paths],
                            skipped)
    _check_rejects(field, summary, out, cfg.max_reject_fraction)
    rtf = audio_s / (done - ready) if done > ready else 0.0
    log.info("tokenize %s: models ready in %.1f s, %d shards (%.0f s of audio) in %.1f s: "
             "%.1fx real time", field, ready - t0, len(jobs), audio_s, done - ready, rtf)
    # not written to the tables: where the shards ran, how long it took, the real-time factor
    return {**summary, "nodes": nodes, "startup_s": ready - t0, "tokenize_s": done - ready,
            "audio_s": audio_s, "realtime_x": rtf,
            "realtime_x_with_startup": audio_s / (done - t0) if done > t0 else 0.0}


def _shards_or_none(folder, split) -> list[str]:
    from cantus.audio_stream import shard_paths

    try:
        return shard_paths(folder, split)
    except FileNotFoundError:
        return []


def _write_tables(out: str, field: str, description: dict[str, Any],
                  summaries: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    rows = [(s["shard"], k, n) for s in summaries for k, n in zip(s["keys"], s["lengths"])]
    index = pa.table({"key": [r[1] for r in rows], "shard": [r[0] for r in rows],
                      "split": [r[0].split("-")[0] for r in rows],
                      "length": pa.array([r[2] for r in rows], pa.int32())})
    rejects = [r for s in summaries for r in s["rejects"]]
    shards.write_parquet(shards.join(out, "index.parquet"), index)
    shards.write_parquet(shards.join(out, "rejects.parquet"), pa.table(
        {c: pa.array([r[c] for r in rejects], pa.string()) for c in ("key", "reason", "detail")}))
    shards.atomic_write_json(shards.join(out, "manifest.json"),
                             {"field": field, "tokenizer": description})
    summary = {"field": field, "shards": len(summaries), "shards_skipped": skipped,
               "chunks": len(rows), "rejects": len(rejects)}
    log.info("tokenize %s: %s", field, summary)
    return summary


def _check_rejects(field: str, summary: dict[str, Any], out: str, limit: float) -> None:
    """Raise TooManyRejects when more than ``limit`` of the chunks were rejected (or none
    came through), naming the count and the first error (``out/rejects.parquet``)."""
    rejects, total = summary["rejects"], summary["chunks"] + summary["rejects"]
    if summary["chunks"] > 0 and rejects <= limit * total:
        return
    first = shards.read_parquet(shards.join(out, "rejects.parquet")).slice(0, 1).to_pylist()
    what = (f"; first: {first[0]['key']} {first[0]['reason']}: {first[0]['detail']}" if first
            else "")
    raise TooManyRejects(f"tokenize {field}: {rejects} of {total} chunks rejected, more than "
                         f"tokenize.max_reject_fraction {limit:g} allows{what} "
                         f"(all in {shards.join(out, 'rejects.parquet')})")


def load_config(params: str) -> TokenizeConfig:
    return load_section(params, "tokenize", TokenizeConfig)


def field_main(tokenizer: type, argv: list[str] | None = None) -> int:
    """The stage command of one field: ``--audio``, ``--out`` and a flag per model folder.

    Returns 0 done, 2 a bad params key or a missing input (one line on stderr naming it),
    1 too many rejects.
    """
    field = tokenizer.field
    ap = argparse.ArgumentParser(prog=f"cantus tokenize {field}",
                                 description=f"Tokenize audio shards into {field} token shards.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--audio", required=True, help="audio shard folder (ingest output)")
    ap.add_argument("--out", required=True, help=f"token shard folder (data/tokens_{field})")
    for name in tokenizer.models:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True,
                        help=f"{name} model folder")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.params)
        models = {m: getattr(args, m) for m in tokenizer.models}
        for flag, folder in {"audio": args.audio, **models}.items():
            if not shards.is_dir(folder):  # local, or a URL (s3://bucket/audio)
                raise FileNotFoundError(f"--{flag.replace('_', '-')} {folder}: no such folder")
        if not _shards_or_none(args.audio, "train") + _shards_or_none(args.audio, "valid"):
            raise FileNotFoundError(f"--audio {args.audio}: no audio shards "
                                    "(train-*.tar / valid-*.tar)")
    except (ConfigError, FileNotFoundError) as e:
        print(f"cantus tokenize {field}: {'configuration error: ' if isinstance(e, ConfigError) else ''}{e}",
              file=sys.stderr)
        return 2
    if cfg.executor == "ray":
        from cantus.parallel import init_ray

        init_ray()
    try:
        summary = run(cfg, tokenizer, args.audio, models, args.out)
    except TooManyRejects as e:
        print(f"cantus tokenize {field}: {e}", file=sys.stderr)
        return 1
    print(f"tokenize {field}: {summary['chunks']} chunks in {summary['shards']} shards "
          f"({summary['shards_skipped']} already done), {summary['rejects']} rejects -> {args.out}"
          f"; shards per node: {json.dumps(summary['nodes'], sort_keys=True)}")
    print(f"tokenize {field}: {summary['audio_s']:.0f} s of audio in {summary['tokenize_s']:.1f} s"
          f": {summary['realtime_x']:.1f}x real time ({summary['realtime_x_with_startup']:.1f}x "
          f"with the {summary['startup_s']:.1f} s start-up)")
    return 0
