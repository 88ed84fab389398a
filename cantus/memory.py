"""Process-wide allocator settings for long-running model processes (glibc only).

glibc gives each freed block of more than its mmap threshold
back to the system, so every fresh 10-30 MB activation of a long clip is
page-faulted in again (~20 ms per 30 MB here). ``keep_freed_memory`` raises the
threshold to glibc's maximum (32 MiB) and stops heap trimming, once per
process, so the encoder's activations reuse memory already mapped (measured
by ``bench/codec.py``: ~15% on the paper-size encode). Peak memory is
unchanged; freed memory is kept for reuse instead of returned. Also off with
``CANTUS_NATIVE=0``.

A tokenizer process runs one model on same-sized shards again and again, and
w2v-BERT's attention maps of a 20 s clip are 64 MB each, above any threshold:
``keep_freed_memory(every_size=True)`` (called by ``cantus.tokenize.run``'s model actors on
CPU) also stops glibc from mmap-ing any block, so those are reused as well
(measured on the demo semantic field: page faults per shard 500 k -> 0 after
the first two, 2.5 -> 1.7 s per shard). Only a free heap top above 1 GiB goes
back to the system.
"""

from __future__ import annotations

import ctypes
import os

_tuned = 0  # 0: glibc's defaults; 1: blocks up to 32 MiB kept; 2: blocks of every size kept
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 * 2**20             # glibc's upper bound on 64-bit systems


def enabled() -> bool:
    """False with ``CANTUS_NATIVE=0`` (no native code, no allocator tuning)."""
    return os.environ.get("CANTUS_NATIVE", "1") != "0"


def keep_freed_memory(every_size: bool = False) -> None:
    """Once per process: glibc keeps freed blocks of up to 32 MiB (or of every size) for reuse."""
    global _tuned
    level = 2 if every_size else 1
    if _tuned >= level or not enabled():
        return
    _tuned = level
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, 2**30)
        if every_size:
            libc.mallopt(M_MMAP_MAX, 0)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
