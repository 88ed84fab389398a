"""Processes for the benches: plain loops started side by side, and a command's process
tree watched for its time, CPU and peak memory.

``run_together`` starts every process, waits until each has said it is ready (imports or
model loading done: ``{go}.ready{k}``), then creates ``go``; each child calls
``ready_then_wait`` before its timed work. So the timed parts overlap, start-up left out.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def run_together(argv: Callable[[int, Path], list[str]], n: int, work: Path,
                 env: dict[str, str] | None = None) -> list[str]:
    """Stdout of ``argv(k, go)`` for k in 0..n-1, run side by side and released together."""
    go = work / f"go-{n}-{time.monotonic_ns()}"
    procs = [subprocess.Popen(argv(k, go), stdout=subprocess.PIPE, text=True, env=env)
             for k in range(n)]
    while (sum(Path(f"{go}.ready{k}").exists() for k in range(n)) < n
           and all(p.poll() is None for p in procs)):
        time.sleep(0.01)
    go.touch()
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"plain loop process failed ({p.returncode})")
        outs.append(out)
    return outs


def ready_then_wait(go: Path, part: int) -> None:
    """In a child: say this part is ready, then wait until the parent releases all parts."""
    Path(f"{go}.ready{part}").touch()
    while not go.exists():
        time.sleep(0.005)


def watch(cmd: list[str], log: Path, every: float = 0.1, cwd: Path | None = None) -> dict:
    """Run ``cmd`` (output to ``log``) and sample its process tree: wall seconds, CPU
    seconds of every process seen, peak RSS (MiB) of the whole tree, of the driver, of its
    descendants together (``workers``) and of the largest one."""
    import psutil

    mib = 2.0 ** 20
    with log.open("w") as f:
        t0 = time.perf_counter()
        proc = psutil.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds seen
        tree = driver = workers = largest = 0.0
        while proc.poll() is None:
            try:
                kids = proc.children(recursive=True)
            except psutil.Error:
                kids = []
            rss = []
            for p in [proc] + kids:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        cpu[(p.pid, p.create_time())] = t.user + t.system
                        rss.append(p.memory_info().rss / mib)
                except psutil.Error:
                    rss.append(0.0)
            if rss:
                tree = max(tree, sum(rss))
                driver = max(driver, rss[0])
                workers = max(workers, sum(rss[1:]))
                largest = max(largest, max(rss[1:], default=0.0))
            time.sleep(every)
        wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")
    return {"s": round(wall, 2), "cpu_s": round(sum(cpu.values()), 2),
            "tree_rss_mib": round(tree, 1), "driver_rss_mib": round(driver, 1),
            "workers_rss_mib": round(workers, 1), "largest_worker_rss_mib": round(largest, 1)}
