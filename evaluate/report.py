"""A self-contained HTML report: metrics beside baselines, players and spectrograms.

Goes in: the metrics table rows, the example clips (float32 audio), and the
gathered stage metrics. Comes out: one HTML file with every image and sound
embedded as a data URI, so it can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from cantus.audio import resample


def wav_uri(audio: np.ndarray, rate: int, out_rate: int = 16000) -> str:
    """A 16-bit mono WAV data URI (downsampled to keep the page small)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(resample(np.asarray(audio, np.float32), rate, out_rate), -1, 1),
             out_rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def png_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def spectrogram_uri(audio: np.ndarray, rate: int, title: str) -> str:
    """A log-magnitude STFT image of ``audio`` (0 to 8 kHz)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_fft, hop = 1024, 256
    x = np.asarray(audio, np.float32)
    x = np.pad(x, (0, max(0, n_fft - len(x))))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    # dB relative to a full-scale sine (Hann window: peak |X| = N / 4), on one fixed
    # 90 dB range, so a generation and a real clip are drawn on the same scale
    spec = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T / (n_fft / 4) + 1e-9)
    top = int(8000 / (rate / n_fft))
    fig, ax = plt.subplots(figsize=(5, 2.2))
    ax.imshow(spec[:top], origin="lower", aspect="auto", cmap="magma", vmin=-90, vmax=0,
              extent=(0, len(x) / rate, 0, top * rate / n_fft / 1000))
    ax.set(title=title, xlabel="s", ylabel="kHz")
    return png_uri(fig)


def bars_uri(rows: list[dict[str, Any]]) -> str:
    """One panel per metric (own scale): the generated value beside its baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get("value"), (int, float))]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["metric"], []).append(r)
    colours = {"cantus": "#d95f02", "baseline": "#7570b3", "reference": "#1b9e77"}
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(7, 0.35 * len(rows) + 0.5 * len(groups) + 0.5))
    for ax, (metric, rs) in zip(axes[:, 0], groups.items()):
        ax.barh(range(len(rs)), [r["value"] for r in rs],
                color=[colours.get(r["role"], "grey") for r in rs])
        ax.set_yticks(range(len(rs)), [r["series"] for r in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("orange: generated · purple: chance / baseline · green: real-audio reference",
                 fontsize=8)
    fig.tight_layout()
    return png_uri(fig)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
font-size:14px}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ex{display:flex;gap:1em;flex-wrap:wrap;margin-bottom:1.5em}.clip{width:32%}
audio{width:100%}img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}"""


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f"<td class='num'>{_fmt(r.get(c, ''))}</td>" if isinstance(r.get(c), (int, float))
        else f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _diagnostics(rows: list[dict[str, Any]], alarms: list[dict[str, Any]]) -> list[str]:
    """The Diagnostics section: each hop's figures beside their baselines, a bar chart
    (one panel per hop) and the collapse alarms."""
    out = ["<h2 id='diagnostics'>Diagnostics</h2>",
           "<p>Each hop of the chain beside its baseline: does an LM stage use its "
           "conditioning, do caption text tokens land on their audio's MuLan tokens, what "
           "MuLan hears of real audio through the codec.</p>"]
    if rows:
        out += [table(rows, ["hop", "series", "role", "value", "n", "note"]),
                f"<img alt='diagnostics beside baselines' "
                f"src='{bars_uri([{**r, 'metric': r['hop']} for r in rows])}'>"]
    if alarms:
        raised = [a["alarm"] for a in alarms if a["raised"]]
        out += [f"<h3>Collapse alarms</h3><p>{len(raised)} of {len(alarms)} raised"
                f"{': ' + html.escape(', '.join(raised)) if raised else ''}.</p>",
                table(alarms, ["alarm", "value", "threshold", "raised", "note"])]
    return out


def render(path: str | Path, summary: dict[str, Any], scores: list[dict[str, Any]],
           stages: list[dict[str, Any]], examples: list[dict[str, Any]],
           diagnostics: list[dict[str, Any]] | None = None,
           alarms: list[dict[str, Any]] | None = None) -> None:
    """Write the report. ``examples``: dicts with prompt, gen (audio), real (audio or None),
    rate, and a note; ``diagnostics``: rows of each hop (hop, series, role, value, n,
    note); ``alarms``: rows (alarm, value, threshold, raised, note)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Cantus evaluation"
             f"</title><style>{CSS}</style></head><body>",
             "<h1>Cantus: generation and evaluation</h1>",
             f"<p>{html.escape(summary['intro'])}</p>",
             "<h2 id='metrics'>Generation metrics</h2>",
             table(scores, ["metric", "series", "role", "value", "n", "note"]),
             f"<img alt='metrics beside baselines' src='{bars_uri(scores)}'>",
             "<h2 id='stages'>Earlier stages</h2>",
             table(stages, ["stage", "metric", "value", "baseline", "baseline is"]),
             *_diagnostics(diagnostics or [], alarms or []),
             "<h2 id='examples'>Examples</h2>"]
    for ex in examples:
        parts.append(f"<h3>{html.escape(ex['prompt'])}</h3><p>{html.escape(ex['note'])}</p>"
                     "<div class='ex'>")
        for label, audio in (("generated", ex["gen"]), ("real", ex.get("real")),
                             ("real through the codec", ex.get("codec"))):
            if audio is None:
                continue
            parts.append(f"<div class='clip'><b>{label}</b><br>"
                         f"<audio controls src='{wav_uri(audio, ex['rate'])}'></audio>"
                         f"<img alt='{label} spectrogram' "
                         f"src='{spectrogram_uri(audio, ex['rate'], label)}'></div>")
        parts.append("</div>")
    parts.append(f"<p><small>{html.escape(summary['footer'])}</small></p></body></html>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(parts), encoding="utf-8")
