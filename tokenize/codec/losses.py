"""SoundStream's discriminators and losses.

Goes in: real and reconstructed waveforms ``float[B, N]``. Comes out: scalar
losses. The discriminators are a multi-scale waveform discriminator (MelGAN's,
on the signal at 1x, 1/2x and 1/4x rate) and SoundStream's STFT discriminator
(2-D convolutions over the complex spectrogram). Losses: hinge adversarial
losses, feature matching (L1 between the discriminators' feature maps on real
and reconstructed audio), a multi-scale log-mel reconstruction loss (window
sizes ``2^6 .. 2^11``, as in the SoundStream paper) and a time-domain L1.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from cantus.tokenize.codec.params import DiscConfig


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class WaveDiscriminator(nn.Module):
    """MelGAN waveform discriminator: float[B, 1, N] -> (logits, feature maps)."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        convs = [nn.Conv1d(1, c, 15, padding=7)]
        for _ in range(4):
            out = min(c * 4, channels * 64)  # MelGAN: 16 -> 64 -> 256 -> 1024
            groups = max(1, min(c, out) // 4)
            convs.append(nn.Conv1d(c, out, 41, stride=4, padding=20, groups=groups))
            c = out
        convs.append(nn.Conv1d(c, c, 5, padding=2))
        self.convs = nn.ModuleList(convs)
        self.out = nn.Conv1d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor):
        feats = []
        for conv in self.convs:
            x = _lrelu(conv(x))
            feats.append(x)
        return self.out(x), feats


class STFTDiscriminator(nn.Module):
    """SoundStream's STFT discriminator on (real, imag) of a ``window``-sample STFT."""

    def __init__(self, channels: int, window: int):
        super().__init__()
        self.window, self.hop = window, window // 4
        c = channels
        layers = [nn.Conv2d(2, c, 7, padding=3)]
        for i, (ts, fs) in enumerate([(1, 2), (2, 2), (1, 2), (2, 2), (1, 2), (2, 2)]):
            m = 2 if i % 2 else 1
            layers.append(nn.Conv2d(c, c * m, (3, 4), stride=(ts, fs), padding=(1, 1)))
            c *= m
        self.convs = nn.ModuleList(layers)
        self.out = nn.Conv2d(c, 1, (1, 1))
        self.register_buffer("win", torch.hann_window(window), persistent=False)

    def forward(self, wav: torch.Tensor):
        spec = torch.stft(wav[:, 0], self.window, self.hop, window=self.win, return_complex=True)
        x = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # (B, 2, frames, F)
        feats = []
        for conv in self.convs:
            x = _lrelu(conv(x))
            feats.append(x)
        return self.out(x), feats


class Discriminators(nn.Module):
    """Every discriminator: float[B, N] -> list of (logits, feature maps)."""

    def __init__(self, cfg: DiscConfig):
        super().__init__()
        self.waves = nn.ModuleList(WaveDiscriminator(cfg.wave_channels)
                                   for _ in range(cfg.scales))
        self.stft = STFTDiscriminator(cfg.stft_channels, cfg.stft_window)

    def forward(self, wav: torch.Tensor):
        x = wav[:, None]  # (B, 1, N)
        outs = [self.stft(x)]
        for i, disc in enumerate(self.waves):
            if i:
                x = F.avg_pool1d(x, 4, stride=2, padding=1, count_include_pad=False)
            outs.append(disc(x))
        return outs


def disc_hinge(real_outs, fake_outs) -> torch.Tensor:
    """Discriminator hinge loss, averaged over discriminators."""
    loss = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for (r, _), (f, _) in zip(real_outs, fake_outs))
    return loss / len(real_outs)


def gen_hinge(fake_outs) -> torch.Tensor:
    """Generator's adversarial hinge loss (SoundStream eq. 2)."""
    return sum(F.relu(1 - f).mean() for f, _ in fake_outs) / len(fake_outs)


def feature_matching(real_outs, fake_outs) -> torch.Tensor:
    """Mean L1 between real and fake feature maps over every layer and discriminator."""
    terms = [(fr.detach() - ff).abs().mean()
             for (_, real), (_, fake) in zip(real_outs, fake_outs) for fr, ff in zip(real, fake)]
    return sum(terms) / len(terms)


class MultiScaleMel(nn.Module):
    """Multi-scale spectral reconstruction loss over windows ``2^lo .. 2^hi``.

    Mean L1 between log10 mel magnitudes (floored at 1e-5), averaged over the
    windows: the quantity eval_codec's mel distance measures. The SoundStream
    paper's form (L1 on mel plus ``sqrt(s / 2)`` times a per-frame L2 on
    log-mel) weighs the 2048 window 32x and sits in the hundreds; in the demo's
    few hundred CPU steps it only ever learnt the average spectrum (the decoder
    output did not depend on the codes), while this form, with the waveform L1
    of ``waveform_l1``, learns a code-dependent reconstruction in the same budget.
    """

    def __init__(self, sample_rate: int, lo: int = 6, hi: int = 11, n_mels: int = 64):
        super().__init__()
        import torchaudio

        self.specs = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate, n_fft=2 ** e, hop_length=2 ** e // 4, n_mels=min(n_mels, 2 ** e // 4),
                power=1.0, center=True, norm="slaney", mel_scale="slaney")
            for e in range(lo, hi + 1))

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        loss = real.new_zeros(())
        for spec in self.specs:
            mr, mf = spec(real.float()), spec(fake.float())  # (B, mels, frames)
            loss = loss + (mr.clamp_min(1e-5).log10() - mf.clamp_min(1e-5).log10()).abs().mean()
        return loss / len(self.specs)


def waveform_l1(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Time-domain L1 relative to the batch's mean |amplitude|: float[B, N] each -> scalar.

    The mel loss is blind to phase; this term is what gives a positive SI-SDR.
    """
    return (real - fake).abs().mean() / real.abs().mean().clamp_min(1e-3)
