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

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from cantus.memory import keep_freed_memory
from cantus.tokenize.codec import native as cpu_native

CHANNELS_LAST = torch.channels_last


def _image(rows: torch.Tensor) -> torch.Tensor:
    """rows [L, C] -> the same memory as a channels-last image [1, C, 1, L]."""
    return rows.view(1, 1, *rows.shape).permute(0, 3, 1, 2)


def _rows(image: torch.Tensor) -> torch.Tensor:
    """A channels-last image [1, C, H, W] -> rows [H * W, C] (a view)."""
    return image.permute(0, 2, 3, 1).reshape(-1, image.shape[1])


def _conv(conv: nn.Conv1d, rows: torch.Tensor) -> torch.Tensor:
    """A CausalConv1d on rows [L, C_in] -> rows [L' >= L / stride, C_out] (valid prefix exact)."""
    k, d, s = conv.kernel_size[0], conv.dilation[0], conv.stride[0]
    w, b = conv.weight, conv.bias
    if k == 1 and s == 1:
        flat = w[:, :, 0].t()
        return rows @ flat if b is None else torch.addmm(b, rows, flat)
    if conv.in_channels == 1 and d == 1 and s == 1:  # im2col: [L, k] @ [k, C_out]
        cols = F.pad(rows[:, 0], (k - 1, 0)).unfold(0, k, 1)
        flat = w[:, 0].t()
        return cols @ flat if b is None else torch.addmm(b, cols, flat)
    if s == 1:  # the d phases side by side: [1, C, L / d, d], kernel (k, 1); d = 1 too
        n = rows.shape[0] // d
        phases = rows[: n * d].view(1, n, d, rows.shape[1]).permute(0, 3, 1, 2)
        weight = w[:, :, :, None].contiguous(memory_format=CHANNELS_LAST)
        return _rows(F.conv2d(phases, weight, b, padding=(k - 1, 0)))
    left = (k - 1) * d - (s - 1)
    weight = w[:, :, None].contiguous(memory_format=CHANNELS_LAST)
    return _rows(F.conv2d(_image(rows), weight, b, stride=(1, s), padding=(0, left),
                          dilation=(1, d)))


def _residual(unit: nn.Module, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """ELU, dilated conv, ELU, k=1 conv, plus x: the last two as one addmm into x.

    ``x`` is overwritten: it is always an intermediate of ``_run``, needed no more.
    Its true value is ``x + pending``: the k=1 convs' biases are not added to x
    but carried to the next ELU, which adds them on the way (one pass fewer).
    """
    _, dilated, _, pointwise = unit.block
    h = _conv(dilated, cpu_native.elu(x, bias=pending))[: x.shape[0]]
    cpu_native.elu(h, inplace=True)
    return x.addmm_(h, pointwise.weight[:, :, 0].t())


def _tail(strides: tuple[int, ...], dilation: int = 9) -> int:
    """Zero samples appended so every stage keeps >= ``dilation`` spare frames."""
    hop = math.prod(strides)
    deepest = math.prod(strides[:-1])  # samples per frame of the last stage
    return hop * math.ceil(dilation * deepest / hop)


@torch.inference_mode()
def encode_latents(encoder: nn.Module, wav: torch.Tensor, hop: int,
                   strides: tuple[int, ...]) -> torch.Tensor:
    """float[B, 1, N] (N a multiple of ``hop``) -> float[B, D, N / hop], as ``encoder(wav)``."""
    keep_freed_memory()
    frames = wav.shape[-1] // hop
    out = []
    with parametrize.cached():
        for item in wav[:, 0]:
            x = F.pad(item, (0, _tail(strides)))[:, None]
            out.append(_run(encoder.net, x)[:frames].t())
    return torch.stack(out)


def _transposed(conv: nn.ConvTranspose1d, rows: torch.Tensor) -> torch.Tensor:
    """A CausalConvTranspose1d (kernel 2s, stride s) on rows [L, C_in] -> rows [L * s, C_out].

    Output sample j*s + r is x[j] @ W[:, :, r] + x[j-1] @ W[:, :, s + r]: a causal k=2
    convolution over input frames with s * C_out channels, phase-major.
    """
    s, w = conv.stride[0], conv.weight  # w: (C_in, C_out, 2s)
    if conv.kernel_size[0] != 2 * s:
        raise ValueError(f"transposed conv of kernel {conv.kernel_size[0]}, stride {s}: "
                         "the CPU path handles kernel = 2 x stride only")
    c_in, c_out = w.shape[0], w.shape[1]
    taps = w.view(c_in, c_out, 2, s).permute(3, 1, 0, 2).reshape(s * c_out, c_in, 2)
    weight = taps.flip(-1)[:, :, None].contiguous(memory_format=CHANNELS_LAST)
    bias = None if conv.bias is None else conv.bias.repeat(s)
    y = _rows(F.conv2d(_image(rows), weight, bias, padding=(0, 1)))[: rows.shape[0]]
    return y.reshape(-1, c_out)


def _run(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    from cantus.tokenize.codec.model import ResidualUnit

    pending = None  # biases of residual units not yet added to x (see _residual)
    for layer in net:
        if isinstance(layer, ResidualUnit):
            x = _residual(layer, x, pending)
            b = layer.block[3].bias
            if b is not None:
                pending = b if pending is None else pending + b
            continue
        if isinstance(layer, nn.ELU):
            x = cpu_native.elu(x, inplace=layer.inplace, bias=pending)
        else:
            if pending is not None:
                x = x.add_(pending)
            x = _transposed(layer, x) if isinstance(layer, nn.ConvTranspose1d) else _conv(layer, x)
        pending = None
    return x if pending is None else x.add_(pending)


@torch.inference_mode()
def decode_waveform(decoder: nn.Module, latents: torch.Tensor, hop: int) -> torch.Tensor:
    """float[B, D, T] -> float[B, 1, T * hop], as ``decoder(latents)``."""
    keep_freed_memory()
    out = []
    with parametrize.cached():
        for item in latents:
            out.append(_run(decoder.net, item.t().contiguous())[: item.shape[-1] * hop].t())
    return torch.stack(out)
