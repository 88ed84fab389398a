"""Time-major CPU inference of the SEANet encoder and decoder (``encode``/``decode`` on CPU).

The modules' own ``forward`` (channels-first 1-D convolutions) is what trains
and what runs on a GPU. On a CPU the same weights run faster over time-major
rows ``[time, channels]``, seen by oneDNN as channels-last 2-D images
``[1, C, 1, T]``, because no layer reorders its input or output:

- a convolution of dilation d becomes an undilated one down the time axis of
  a ``[T / d, d]`` image (the d interleaved phases side by side), which oneDNN
  runs 1.5-2x faster than a dilated one along a ``[1, T]`` image (for d = 1
  too: a ``[T, 1]`` image is faster than ``[1, T]``); strided convolutions
  stay along ``[1, T]``, their faster side;
- a k=7 convolution may also run as Winograd F(4, 7) over the phases: 10
  products per 4 outputs instead of 28, in cache-sized blocks of time. It wins
  where channels are wide (128 and up) or the ISA is AVX2; ``Plan`` times it
  beside the others, and its error stays within a few times the direct
  convolution's float rounding;
- the one-channel input convolution is an im2col matrix product;
- a residual unit's k=1 convolution and its skip connection are one in-place
  ``addmm``, and its bias is added by the next ELU on the way;
- a transposed convolution of stride s is an ordinary k=2 convolution with
  s x C_out outputs per frame, whose rows are read back as s rows each;
- ELUs use ``cpu_native.elu`` (a vectorised C loop, 3x ``F.elu`` on one
  thread), and glibc is told to keep freed activations for reuse;
- no padding is copied: convolutions pad both sides and the right-hand frames
  they add are left at the end. They are "future" frames that no earlier frame
  depends on (the encoder is causal), so the valid prefix is exact; the input
  gets a short zero tail so every dilated layer keeps whole phases of it.

One batch item at a time: on one thread a long item already fills the matrix
products. The result equals ``Encoder.forward`` to float rounding
(tests/test_codec.py compares the two, and ``decode_waveform`` with
``Decoder.forward``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from cantus.memory import keep_freed_memory
from cantus.tokenize.codec import native as cpu_native

CHANNELS_LAST = torch.channels_last
PATHS = ("cpu", "forward")  # CANTUS_CODEC_PATH: one of these forces it; "auto" (default) measures
log = logging.getLogger(__name__)


class Plan:
    """Which layout each convolution with more than one runs.

    ``choice`` maps a layer's key (``"conv 64>32 k7 d3 s1"``, ``"transposed 512>256 s8"``)
    to a layout name. A key it lacks runs the first layout listed, or, when ``tune``,
    every layout (``_timed``), keeping the fastest in ``choice`` (the first
    unless another takes under ``margin`` of its time: tuned on ~1 s of audio, small
    wins do not carry over to long inputs). All layouts
    give the same values to float rounding; which is fastest depends on the CPU's ISA
    (on AVX2, oneDNN's undilated ``[L, 1]`` images run 3-5x slower than ``[1, L]`` ones).
    """

    margin = 0.85

    def __init__(self, choice: dict[str, str] | None = None, tune: bool = False):
        self.choice, self.tune = dict(choice or {}), tune

    def run(self, key: str, layouts: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        """The output of the layout chosen for ``key`` (timing all of them first if tuning)."""
        name = self.choice.get(key)
        if name in layouts:
            return layouts[name]()
        if not self.tune:
            return next(iter(layouts.values()))()
        best: tuple[float, str, torch.Tensor | None] = (math.inf, "", None)
        for i, (name, fn) in enumerate(layouts.items()):
            t, out = _timed(fn)
            if t < best[0] * (1.0 if i == 0 else self.margin):
                best = (t, name, out)
        self.choice[key] = best[1]
        return best[2]


def _timed(fn: Callable[[], torch.Tensor], rounds: int = 3,
           enough: float = 0.03) -> tuple[float, torch.Tensor]:
    """(best seconds, output) of up to ``rounds`` runs of ``fn``, stopping after a run of
    over ``enough`` seconds (against that, oneDNN's first-run kernel build is noise)."""
    best, out = math.inf, None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        t = time.perf_counter() - start
        best = min(best, t)
        if t > enough:
            break
    return best, out


DEFAULT = Plan()  # every layer's first layout: phases for stride 1, line for the others


def _image(rows: torch.Tensor) -> torch.Tensor:
    """rows [L, C] -> the same memory as a channels-last image [1, C, 1, L]."""
    return rows.view(1, 1, *rows.shape).permute(0, 3, 1, 2)


def _rows(image: torch.Tensor) -> torch.Tensor:
    """A channels-last image [1, C, H, W] -> rows [H * W, C] (a view)."""
    return image.permute(0, 2, 3, 1).reshape(-1, image.shape[1])


def _conv(conv: nn.Conv1d, rows: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
    """A CausalConv1d on rows [L, C_in] -> rows [L' >= L / stride, C_out] (valid prefix exact).

    Convolutions with more than one layout (see ``Plan``) run the one ``plan`` picks.
    """
    k, d, s = conv.kernel_size[0], conv.dilation[0], conv.stride[0]
    w, b = conv.weight, conv.bias
    if k == 1 and s == 1:
        flat = w[:, :, 0].t()
        return rows @ flat if b is None else torch.addmm(b, rows, flat)
    if conv.in_channels == 1 and d == 1 and s == 1:  # im2col: [L, k] @ [k, C_out]
        cols = F.pad(rows[:, 0], (k - 1, 0)).unfold(0, k, 1)
        flat = w[:, 0].t()
        return cols @ flat if b is None else torch.addmm(b, cols, flat)

    def line() -> torch.Tensor:  # along a [1, L] image, dilated and strided as the module
        left = (k - 1) * d - (s - 1)
        weight = w[:, :, None].contiguous(memory_format=CHANNELS_LAST)
        return _rows(F.conv2d(_image(rows), weight, b, stride=(1, s), padding=(0, left),
                              dilation=(1, d)))

    if s == 1:
        def phases() -> torch.Tensor:  # the d phases side by side: [1, C, L / d, d], kernel (k, 1)
            n = rows.shape[0] // d
            image = rows[: n * d].view(1, n, d, rows.shape[1]).permute(0, 3, 1, 2)
            weight = w[:, :, :, None].contiguous(memory_format=CHANNELS_LAST)
            return _rows(F.conv2d(image, weight, b, padding=(k - 1, 0)))

        layouts = {"phases": phases, "line": line}
        if k in WINOGRAD_POINTS:
            layouts["winograd"] = lambda: _winograd(rows, w, b, d)
    elif k == 2 * s and d == 1:
        def frames() -> torch.Tensor:  # [L / s, s * C_in] frames: out[j] = f[j] @ W1 + f[j-1] @ W0
            n, c_in = rows.shape[0] // s, rows.shape[1]
            f = rows[: n * s].view(n, s * c_in)
            taps = w.permute(2, 1, 0)  # [2s, C_in, C_out]
            cur, prev = taps[s:].reshape(s * c_in, -1), taps[:s].reshape(s * c_in, -1)
            out = f @ cur if b is None else torch.addmm(b, f, cur)
            out[1:].addmm_(f[:-1], prev)
            return out

        layouts = {"line": line, "frames": frames}
    else:
        return line()
    return (plan or DEFAULT).run(f"conv {conv.in_channels}>{conv.out_channels} k{k} d{d} s{s}",
                                 layouts)


# Winograd F(4, k) (4 outputs per tile of k + 3 inputs) for the k=7 convolutions: the
# interpolation points, infinity being the last. 10 products per 4 outputs instead of 28.
# These points (+-3/4 where the usual F(4, 3) set stops) keep the error within ~6x the
# direct convolution's float rounding (tests/test_codec.py).
WINOGRAD_POINTS = {7: (0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.75, -0.75)}
WINOGRAD_TILE = 4
_winograd_mats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # AT, G, BT


def winograd_matrices(k: int, m: int = WINOGRAD_TILE) -> tuple[torch.Tensor, ...]:
    """``(AT [m, a], G [a, k], BT [a, a])`` (a = m + k - 1) of Winograd F(m, k), from the
    Toom-Cook construction in float64: ``y = AT @ ((G @ g) * (BT @ x))`` is the
    correlation ``y[i] = sum_j g[j] x[i + j]`` of an ``a``-sample tile ``x``."""
    points = WINOGRAD_POINTS[k]
    a = m + k - 1
    if len(points) != a - 1:
        raise ValueError(f"Winograd F({m}, {k}) needs {a - 1} finite points, got {len(points)}")

    def vandermonde(n: int) -> torch.Tensor:  # a x n: the points' powers, then infinity
        v = torch.zeros(a, n, dtype=torch.float64)
        v[:-1] = torch.tensor(points, dtype=torch.float64)[:, None] ** torch.arange(n)
        v[-1, -1] = 1.0
        return v

    return vandermonde(m).t(), vandermonde(k), torch.linalg.inv(vandermonde(a)).t()


WINOGRAD_BLOCK = 1 << 14  # floats of one tile point's input per block: its work stays in cache


def _winograd(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, d: int
              ) -> torch.Tensor:
    """The causal convolution of dilation ``d`` (kernel ``w`` [C_out, C_in, k]) on rows
    [L, C_in] by Winograd F(4, k) over each of the d phases: rows [>= L, C_out].

    The time steps go through in blocks of ``WINOGRAD_BLOCK / (d C_in)`` tiles, so the
    transformed input and products of a block (2.5x its input and output) stay in cache."""
    k = w.shape[-1]
    m, a = WINOGRAD_TILE, WINOGRAD_TILE + k - 1
    if k not in _winograd_mats:
        at, g, bt = winograd_matrices(k)
        _winograd_mats[k] = (at.float(), g, bt.float())
    at, g, bt = _winograd_mats[k]
    gw = torch.einsum("ij,ocj->ico", g, w.double()).float()  # [a, C_in, C_out], G per tap
    length, c = rows.shape
    c_out, dc, pad = w.shape[0], d * c, (k - 1) * d
    steps = -(-length // d)  # time steps of each phase
    tiles = -(-steps // m)  # tiles of m outputs per phase
    out = rows.new_empty(tiles * m * d, c_out)
    per_block = max(1, WINOGRAD_BLOCK // dc)
    slab = rows.new_empty((per_block * m + a - 1) * d, c)
    for t0 in range(0, tiles, per_block):
        n = min(per_block, tiles - t0)
        lo, hi = t0 * m * d - pad, (t0 * m + n * m + a - 1) * d - pad  # rows of the window
        s = slab[: hi - lo]
        src_lo, src_hi = max(lo, 0), min(hi, length)
        if src_lo > lo or src_hi < hi:
            s.zero_()
        if src_hi > src_lo:
            s[src_lo - lo: src_hi - lo] = rows[src_lo:src_hi]
        windows = s.as_strided((a, n, dc), (dc, m * dc, 1))
        u = (bt @ windows.reshape(a, n * dc)).view(a, n * d, c)
        y = (at @ torch.bmm(u, gw).view(a, -1)).view(m, n, d, c_out)
        out[t0 * m * d:(t0 + n) * m * d].view(n, m, d, c_out).copy_(y.permute(1, 0, 2, 3))
    return out if b is None else out.add_(b)


def _residual(unit: nn.Module, x: torch.Tensor, pending: torch.Tensor | None,
              plan: Plan | None = None) -> torch.Tensor:
    """ELU, dilated conv, ELU, k=1 conv, plus x: the last two as one addmm into x.

    ``x`` is overwritten: it is always an intermediate of ``_run``, needed no more.
    Its true value is ``x + pending``: the k=1 convs' biases are not added to x
    but carried to the next ELU, which adds them on the way (one pass fewer).
    """
    _, dilated, _, pointwise = unit.block
    h = _conv(dilated, cpu_native.elu(x, bias=pending), plan)[: x.shape[0]]
    cpu_native.elu(h, inplace=True)
    return x.addmm_(h, pointwise.weight[:, :, 0].t())


def _tail(strides: tuple[int, ...], dilation: int = 9) -> int:
    """Zero samples appended so every stage keeps >= ``dilation`` spare frames."""
    hop = math.prod(strides)
    deepest = math.prod(strides[:-1])  # samples per frame of the last stage
    return hop * math.ceil(dilation * deepest / hop)


@torch.inference_mode()
def encode_latents(encoder: nn.Module, wav: torch.Tensor, hop: int,
                   strides: tuple[int, ...], plan: Plan | None = None) -> torch.Tensor:
    """float[B, 1, N] (N a multiple of ``hop``) -> float[B, D, N / hop], as ``encoder(wav)``.

    ``plan`` picks each convolution's layout (default: ``DEFAULT``'s).
    """
    keep_freed_memory()
    frames = wav.shape[-1] // hop
    out = []
    with parametrize.cached():
        for item in wav[:, 0]:
            x = F.pad(item, (0, _tail(strides)))[:, None]
            out.append(_run(encoder.net, x, plan)[:frames].t())
    return torch.stack(out)


def _transposed(conv: nn.ConvTranspose1d, rows: torch.Tensor,
                plan: Plan | None = None) -> torch.Tensor:
    """A CausalConvTranspose1d (kernel 2s, stride s) on rows [L, C_in] -> rows [L * s, C_out].

    Output sample j*s + r is x[j] @ W[:, :, r] + x[j-1] @ W[:, :, s + r]: a causal k=2
    convolution over input frames with s * C_out channels, phase-major, run as a
    [1, L] image convolution ("line") or as two matrix products ("frames").
    """
    s, w = conv.stride[0], conv.weight  # w: (C_in, C_out, 2s)
    if conv.kernel_size[0] != 2 * s:
        raise ValueError(f"transposed conv of kernel {conv.kernel_size[0]}, stride {s}: "
                         "the CPU path handles kernel = 2 x stride only")
    c_in, c_out = w.shape[0], w.shape[1]
    bias = None if conv.bias is None else conv.bias.repeat(s)

    def line() -> torch.Tensor:
        taps = w.view(c_in, c_out, 2, s).permute(3, 1, 0, 2).reshape(s * c_out, c_in, 2)
        weight = taps.flip(-1)[:, :, None].contiguous(memory_format=CHANNELS_LAST)
        return _rows(F.conv2d(_image(rows), weight, bias, padding=(0, 1)))[: rows.shape[0]]

    def frames() -> torch.Tensor:
        cur = w[:, :, :s].permute(0, 2, 1).reshape(c_in, s * c_out)
        prev = w[:, :, s:].permute(0, 2, 1).reshape(c_in, s * c_out)
        y = rows @ cur if bias is None else torch.addmm(bias, rows, cur)
        y[1:].addmm_(rows[:-1], prev)
        return y

    key = f"transposed {c_in}>{c_out} s{s}"
    return (plan or DEFAULT).run(key, {"line": line, "frames": frames}).reshape(-1, c_out)


def _run(net: nn.Sequential, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
    from cantus.tokenize.codec.model import ResidualUnit

    pending = None  # biases of residual units not yet added to x (see _residual)
    for layer in net:
        if isinstance(layer, ResidualUnit):
            x = _residual(layer, x, pending, plan)
            b = layer.block[3].bias
            if b is not None:
                pending = b if pending is None else pending + b
            continue
        if isinstance(layer, nn.ELU):
            x = cpu_native.elu(x, inplace=layer.inplace, bias=pending)
        else:
            if pending is not None:
                x = x.add_(pending)
            conv = _transposed if isinstance(layer, nn.ConvTranspose1d) else _conv
            x = conv(layer, x, plan)
        pending = None
    return x if pending is None else x.add_(pending)


@torch.inference_mode()
def decode_waveform(decoder: nn.Module, latents: torch.Tensor, hop: int,
                    plan: Plan | None = None) -> torch.Tensor:
    """float[B, D, T] -> float[B, 1, T * hop], as ``decoder(latents)``.

    ``plan``: as ``encode_latents``'s.
    """
    keep_freed_memory()
    out = []
    with parametrize.cached():
        for item in latents:
            out.append(_run(decoder.net, item.t().contiguous(), plan)[: item.shape[-1] * hop].t())
    return torch.stack(out)


@dataclass
class Choice:
    """What ``SoundStream.encode`` or ``decode`` runs on CPU: ``path`` ``"cpu"`` (this
    module, with ``plan``) or ``"forward"`` (the modules' own), and the measured seconds."""
    path: str
    plan: Plan
    seconds: dict[str, float] | None = None


_chosen: dict[tuple, Choice] = {}  # per process: (config, threads, direction, size) -> choice
TUNE_FRAMES = 500  # at most 10 s of 24 kHz audio (or 500 latent frames) is timed


def _key(cfg: object, direction: str, size: int) -> str:
    """The machine, kernels, torch, thread count, model config and input size (``size``:
    frames up to a power of two) a choice holds for, as a file name's hash."""
    parts = [json.dumps(asdict(cfg), sort_keys=True), torch.__version__, cpu_native._cpu_flags(),
             torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
             str(torch.get_num_threads()), str(cpu_native.available()), direction,
             str(size), "v2"]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def measure(model: nn.Module, direction: str, x: torch.Tensor, compare: bool = True) -> Choice:
    """Tune a ``Plan`` on the input ``x`` (float[B, 1, N] audio to encode, float[B, D, T]
    latents to decode; its first item, at most ``TUNE_FRAMES`` frames) and, if ``compare``,
    time this path against the modules' forward on it: the faster wins."""
    cfg = model.cfg
    if direction == "encode":
        x = x[:1, :, : TUNE_FRAMES * cfg.hop]
        run = lambda plan: encode_latents(  # noqa: E731
            model.encoder, x, cfg.hop, cfg.strides, plan)
        forward = lambda: model.encoder(x)  # noqa: E731
    else:
        x = x[:1, :, :TUNE_FRAMES]
        run = lambda plan: decode_waveform(model.decoder, x, cfg.hop, plan)  # noqa: E731
        forward = lambda: model.decoder(x)  # noqa: E731
    plan = Plan(tune=True)
    run(plan)
    plan.tune = False
    if not compare:
        return Choice("cpu", plan)
    seconds = {"cpu": _timed(lambda: run(plan), enough=0.2)[0],
               "forward": _timed(forward, enough=0.2)[0]}
    return Choice(min(seconds, key=seconds.get), plan, seconds)


def choose(model: nn.Module, direction: str, x: torch.Tensor) -> Choice:
    """The CPU inference path for ``direction`` (``"encode"``/``"decode"``) of a SoundStream
    ``model`` on this machine, for inputs the size of ``x`` (as ``measure``'s).

    ``CANTUS_CODEC_PATH=cpu|forward`` forces one; ``auto`` (the default) measures once per
    machine, kernels, torch version, thread count, model config and power of two of input
    frames (the first call runs each layer's layouts and the forward: 3-5 times one call),
    cached in ``~/.cache/cantus`` (or ``$CANTUS_CACHE``) and per process. Each choice is
    logged once per process.
    """
    forced = os.environ.get("CANTUS_CODEC_PATH", "auto")
    if forced not in (*PATHS, "auto"):
        raise ValueError(f"CANTUS_CODEC_PATH must be one of cpu, forward, auto; got {forced!r}")
    if forced == "forward":
        return Choice("forward", DEFAULT)
    frames = x.shape[-1] // model.cfg.hop if direction == "encode" else x.shape[-1]
    size = max(0, min(frames, TUNE_FRAMES) - 1).bit_length()
    memo = (repr(model.cfg), torch.get_num_threads(), direction, size)
    if memo not in _chosen:  # the machine's part of the key is read once per process here
        cache = Path(os.environ.get("CANTUS_CACHE", Path.home() / ".cache" / "cantus"))
        file = cache / f"codec_path-{_key(model.cfg, direction, size)}.json"
        try:
            saved = json.loads(file.read_text())
            choice = Choice(saved["path"], Plan(saved["plan"]), saved["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            choice = measure(model, direction, x, compare=forced == "auto")
            if forced == "auto":
                try:
                    cache.mkdir(parents=True, exist_ok=True)
                    with tempfile.NamedTemporaryFile("w", dir=cache, delete=False) as f:
                        json.dump({"path": choice.path, "plan": choice.plan.choice,
                                   "seconds": choice.seconds}, f)
                    os.replace(f.name, file)
                except OSError as e:
                    log.warning("could not cache the codec path choice in %s: %s", cache, e)
        _chosen[memo] = choice
        log.info("codec %s on CPU (%s, %d threads, ~%d frames): %s path%s", direction,
                 torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), frames,
                 choice.path, f" (measured s: {choice.seconds})" if choice.seconds else "")
    choice = _chosen[memo]
    return Choice("cpu", choice.plan) if forced == "cpu" else choice
