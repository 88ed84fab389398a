"""The embedded demo corpus: music21 scores rendered through a General MIDI SoundFont.

In: the ``demo`` section of ``params.yaml`` (``DemoConfig``) and the corpus that
ships with music21 (Bach chorales, Palestrina, Essen folk songs, Irish fiddle
tunes). Pieces, instruments, tempo and transposition are drawn from
``numpy.random.default_rng(cfg.seed)``; each piece is synthesised note by note
with tinysoundfont through pretty_midi's ``TimGM6mb.sf2``.

Out: ``<out>/NNNN-<slug>.flac`` (mono, 16-bit, ``cfg.sample_rate`` Hz, exactly
``cfg.max_seconds`` long: short tunes repeat, long pieces are cut with a fade)
and ``<out>/captions.jsonl`` (one object per file, sorted by path: path,
caption, tags, licence, source, title). The same config gives byte-identical
files.

Command: ``python -m cantus.ingest.demo --params params.yaml --out data/demo``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import tinysoundfont
from music21 import bar, corpus, harmony, key, meter, stream
from tqdm import tqdm

from cantus.config import ConfigError, load_section
from cantus.ingest.demo_catalog import (COLLECTIONS, COUNTRIES, DUO_PROBABILITY, FOLK_MELODY,
                                        FORMS, IRISH_MELODY, MINOR_MODES, POLY_SCORINGS,
                                        caption_for, key_name, tempo_word)
from cantus.ingest.params import DemoConfig

log = logging.getLogger(__name__)

SCORE_EXTS = (".mxl", ".xml", ".krn", ".abc")  # preferred format first
CHANNELS = tuple(c for c in range(16) if c != 9)  # channel 10 (index 9) is GM drums
PEAK = 0.89  # -1 dBFS
FADE_SECONDS = 0.5
CORPUS_DIR = Path(corpus.__file__).resolve().parent


@dataclass(frozen=True)
class Candidate:
    """One score in the corpus: a file, or one tune (``number``) of an ABC book."""

    collection: str
    path: str                      # relative to music21's corpus folder, posix
    number: int | None = None
    headers: tuple[tuple[str, str], ...] = ()  # ABC header fields (T, C, O, R), first of each

    @property
    def source(self) -> str:
        return f"music21:{self.path}" + (f"#{self.number}" if self.number is not None else "")


@dataclass(frozen=True)
class Piece:
    """A parsed score reduced to what the renderer and the captions need."""

    title: str
    composer: str | None
    genre: str
    form: str | None
    parts: tuple[tuple[tuple[float, float, int], ...], ...]  # per part: (onset_ql, dur_ql, midi)
    length_ql: float
    beat_ql: float
    meter: str
    tonic_pc: int
    mode: str                      # "major" or "minor"


@dataclass(frozen=True)
class Rendering:
    """The seeded performance choices for one piece."""

    scoring: str                   # "string quartet", "fiddle and flute", "piano"
    texture: str                   # "solo" or "ensemble"
    instruments: tuple[str, ...]   # distinct names, top voice first
    voices: tuple[tuple[int, int], ...]  # per synth channel: (score part, GM program)
    bpm: int
    transpose: int


def soundfont_path() -> Path:
    """pretty_midi's General MIDI SoundFont (found without importing pretty_midi)."""
    return Path(importlib.util.find_spec("pretty_midi").origin).parent / "TimGM6mb.sf2"


def _clean(text: str) -> str:
    """Tidy an ABC header: '"You Bet" -- Reel' -> 'You Bet Reel', 'PICNIC' -> 'Picnic'."""
    if any("\x80" <= ch <= "\x9f" for ch in text):  # cp437 umlauts read as C1 controls
        text = text.encode("latin-1", "replace").decode("cp437", "replace")
    text = " ".join(re.sub(r"\s*--\s*|\"", " ", text).split()).strip(" .")
    return text.title() if text.isupper() else text


def _abc_tunes(text: str) -> list[tuple[int, tuple[tuple[str, str], ...]]]:
    """Reference numbers of the tunes in an ABC file with their first T/C/O/R headers."""
    tunes: dict[int, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"X:\s*(\d+)", line)
        if m:
            current = tunes.setdefault(int(m.group(1)), {})
        elif current is not None and re.match(r"[TCOR]:", line):
            current.setdefault(line[0], _clean(line[2:]))
        elif current is not None and line.startswith("K:"):
            current = None  # headers end at the key line
    return [(n, tuple(sorted(h.items()))) for n, h in sorted(tunes.items())]


def candidates(collection: str) -> list[Candidate]:
    """Every score of a collection, in sorted path (then tune number) order."""
    base = CORPUS_DIR
    files = [p.relative_to(base) for p in (base / collection).rglob("*") if p.suffix in SCORE_EXTS]
    by_stem: dict[str, str] = {}  # one file per piece: bwv277.mxl wins over bwv277.krn
    for p in sorted(files, key=lambda p: (p.with_suffix("").as_posix(),
                                          SCORE_EXTS.index(p.suffix))):
        by_stem.setdefault(p.with_suffix("").as_posix(), p.as_posix())
    out = []
    for rel in (by_stem[k] for k in sorted(by_stem)):
        if not rel.endswith(".abc"):
            out.append(Candidate(collection, rel))
            continue
        tunes = _abc_tunes((base / rel).read_text(encoding="utf-8", errors="replace"))
        single = len(tunes) == 1
        out += [Candidate(collection, rel, None if single else n, h) for n, h in tunes]
    return out


def _key_of(score) -> tuple[int, str]:
    """Tonic pitch class and major/minor: an explicit key, else the analysed key that
    agrees with the key signature (Krumhansl alone often hears G major as E minor)."""
    k = score.recurse().getElementsByClass(key.Key).first()
    if k is not None and k.mode:
        return k.tonic.pitchClass, "minor" if k.mode in MINOR_MODES else "major"
    sig = score.recurse().getElementsByClass(key.KeySignature).first()
    est = score.analyze("key")
    for cand in [est, *est.alternateInterpretations]:
        if sig is None or cand.sharps == sig.sharps:
            return cand.tonic.pitchClass, cand.mode
    return est.tonic.pitchClass, est.mode


def _part_notes(part) -> tuple[tuple[float, float, int], ...]:
    notes = []
    for n in part.flatten().notes:
        if isinstance(n, harmony.ChordSymbol) or n.quarterLength <= 0:
            continue  # chord names and grace notes are not played
        notes += [(float(n.offset), float(n.quarterLength), p.midi) for p in n.pitches]
    return tuple(sorted(notes))


def _describe(cand: Candidate, md_title: str | None) -> tuple[str, str | None, str, str | None]:
    """Title, composer, genre and form of a candidate."""
    genre, composer, _, _ = COLLECTIONS[cand.collection]
    h = dict(cand.headers)
    stem = Path(cand.path).stem
    title = h.get("T") or _clean(md_title or "")
    form = None
    if cand.collection == "bach":
        title = title or "BWV " + stem.removeprefix("bwv")
        form = "chorale"
    elif cand.collection == "palestrina":
        title = stem.replace("_", " ")
        form = {"Agnus": "Agnus Dei"}.get(stem.split("_")[0], stem.split("_")[0])
    else:
        composer = h.get("C") or None
        words = f"{h.get('R', '')} {title}".lower()
        form = next((f for w, f in FORMS.items() if re.search(rf"\b{w}\b", words)), None)
    if cand.collection == "essenFolksong":
        origin = h.get("O", "")
        hits = sorted((origin.find(c), adj) for c, adj in COUNTRIES.items() if c in origin)
        genre = f"{hits[0][1] if hits else 'European'} folk song".lower()
    elif genre == "irish folk" and re.search(r"strathspey|highland|scotch|scottish", title.lower()):
        genre = "scottish folk"
    return title or stem, composer, genre, form


def _imply_repeat_starts(score) -> None:
    """Mark a start-repeat after every end-repeat barline not followed by one: a ``:|``
    with no ``|:`` repeats back to the previous ``:|`` (folk-tune books write AABB that
    way). Without it music21 repeats back to the top at each ``:|``, so a tune of 7
    strains expanded 36-fold (O'Neill's 1010: 168 -> 6,096 quarter notes, 270 MiB)."""
    for part in score.parts:
        measures = list(part.getElementsByClass(stream.Measure))
        for m, nxt in zip(measures, measures[1:]):
            right, left = m.rightBarline, nxt.leftBarline
            if (isinstance(right, bar.Repeat) and right.direction == "end"
                    and not (isinstance(left, bar.Repeat) and left.direction == "start")):
                nxt.leftBarline = bar.Repeat(direction="start")


def load_piece(cand: Candidate) -> Piece:
    """Parse one candidate with music21 (repeats expanded, ties merged)."""
    kw = {} if cand.number is None else {"number": cand.number}
    score = corpus.parse(cand.path, forceSource=True, **kw)
    if isinstance(score, stream.Opus):
        score = score.scores[0]
    _imply_repeat_starts(score)
    try:
        score = score.expandRepeats()
    except Exception as e:  # music21 raises several types on odd repeat marks
        log.debug("%s: repeats not expanded (%s)", cand.source, e)
    score = score.stripTies()
    parts = tuple(p for p in (_part_notes(x) for x in score.parts) if p)
    if not parts:
        raise ValueError("no notes")
    ts = score.recurse().getElementsByClass(meter.TimeSignature).first()
    tonic, mode = _key_of(score)
    title, composer, genre, form = _describe(cand, score.metadata.title if score.metadata else None)
    length = max(on + d for p in parts for on, d, _ in p)
    return Piece(title, composer, genre, form, parts, float(max(length, score.highestTime)),
                 float(ts.beatDuration.quarterLength) if ts else 1.0,
                 ts.ratioString if ts else "4/4", tonic, mode)


def choose_rendering(piece: Piece, collection: str, rng: np.random.Generator) -> Rendering:
    """Seeded scoring, tempo and transposition for a piece."""
    n = len(piece.parts)
    if n > 1:
        scoring = str(rng.choice(list(POLY_SCORINGS)))
        texture, table = POLY_SCORINGS[scoring]
        idx = [round(i * (len(table) - 1) / (n - 1)) for i in range(n)]
        voices = tuple((i, table[j][1]) for i, j in enumerate(idx))
        names = tuple(dict.fromkeys(table[j][0] for j in idx))
    else:
        pool = IRISH_MELODY if "irish" in piece.genre or "scottish" in piece.genre else FOLK_MELODY
        k = 2 if rng.random() < DUO_PROBABILITY else 1
        names = tuple(str(x) for x in rng.choice(list(pool), size=k, replace=False))
        voices = tuple((0, pool[x]) for x in names)
        scoring = " and ".join(names)
        texture = "ensemble" if k > 1 else "solo"
    if len(voices) > len(CHANNELS):
        raise ValueError(f"{len(voices)} parts, more than {len(CHANNELS)} channels")
    lo, hi = COLLECTIONS[collection][3]
    bpm = int(rng.integers(lo, hi + 1))
    transpose = int(rng.integers(-3, 4))
    return Rendering(scoring, texture, names, voices, bpm, transpose)


def note_events(piece: Piece, r: Rendering, n_samples: int, sr: int,
                rng: np.random.Generator) -> list[tuple[int, int, int, int, int]]:
    """Sorted (sample, on, channel, key, velocity) events; the piece loops to fill n_samples.

    Note-offs sort before note-ons at the same sample so repeated notes retrigger."""
    spq = 60.0 / (r.bpm * piece.beat_ql)  # seconds per quarter note
    loop = piece.length_ql * spq
    seconds = n_samples / sr
    events = []
    for rep in range(max(1, math.ceil(seconds / loop))):
        for v, (part, _) in enumerate(r.voices):
            base_vel = 100 if part == 0 else 86
            for on, dur, midi in piece.parts[part]:
                t0, t1 = rep * loop + on * spq, rep * loop + (on + dur) * spq
                pitch = midi + r.transpose
                if t0 >= seconds or not 0 <= pitch <= 127:
                    continue
                vel = int(np.clip(base_vel + rng.integers(-6, 7), 1, 127))
                s0 = round(t0 * sr)
                events.append((s0, 1, CHANNELS[v], pitch, vel))
                events.append((max(round(t1 * sr), s0 + 1), 0, CHANNELS[v], pitch, 0))
    return sorted(events)


def synthesize(sf2: bytes, r: Rendering, events, n_samples: int, sr: int) -> np.ndarray:
    """Drive a fresh tinysoundfont synth through the events; mono float32[n_samples]."""
    synth = tinysoundfont.Synth(samplerate=sr)
    sfid = synth.sfload(sf2)
    for v, (_, program) in enumerate(r.voices):
        synth.program_select(CHANNELS[v], sfid, 0, program)
    buf = np.zeros((n_samples, 2), np.float32)  # interleaved stereo, as tsf renders
    pos = 0
    for at, on, chan, pitch, vel in events:
        at = min(at, n_samples)
        if at > pos:
            synth.generate_simple(at - pos, buffer=memoryview(buf[pos:at]))
            pos = at
        if pos >= n_samples:
            break
        if on:
            synth.noteon(chan, pitch, vel)
        else:
            synth.noteoff(chan, pitch)
    if pos < n_samples:
        synth.generate_simple(n_samples - pos, buffer=memoryview(buf[pos:]))
    return buf.mean(axis=1)


def finish(audio: np.ndarray, sr: int) -> np.ndarray:
    """Peak-normalise to -1 dBFS and fade out at the cut; int16 samples."""
    peak = float(np.max(np.abs(audio)))
    if peak < 1e-4:
        raise ValueError("silent rendering")
    audio = audio.astype(np.float64) * (PEAK / peak)
    n = min(len(audio), int(FADE_SECONDS * sr))
    audio[len(audio) - n:] *= 0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, n))
    return np.round(audio * 32767).astype(np.int16)


def tags_for(piece: Piece, r: Rendering) -> dict:
    """What is known about a rendering (the key is the transposed one)."""
    return {"genre": piece.genre, "form": piece.form, "composer": piece.composer,
            "instruments": list(r.instruments), "scoring": r.scoring, "texture": r.texture,
            "tempo_bpm": r.bpm, "tempo": tempo_word(r.bpm),
            "key": key_name(piece.tonic_pc, piece.mode, r.transpose), "mode": piece.mode,
            "meter": piece.meter, "transpose": r.transpose}


def slug(title: str, limit: int = 40) -> str:
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:limit].strip("-") or "piece"


def write_flac(path: Path, samples: np.ndarray, sr: int) -> None:
    """Write 16-bit FLAC atomically (temp name in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    soundfile.write(tmp, samples, sr, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


def render(cand: Candidate, slot: int, cfg: DemoConfig, sf2: bytes, out: Path) -> dict:
    """Parse, perform and write one piece; its captions.jsonl record."""
    rng = np.random.default_rng([cfg.seed, slot])
    piece = load_piece(cand)
    r = choose_rendering(piece, cand.collection, rng)
    n = int(round(cfg.max_seconds * cfg.sample_rate))
    audio = synthesize(sf2, r, note_events(piece, r, n, cfg.sample_rate, rng), n, cfg.sample_rate)
    name = f"{slot:04d}-{slug(piece.title)}.flac"
    write_flac(out / name, finish(audio, cfg.sample_rate), cfg.sample_rate)
    tags = tags_for(piece, r)
    return {"path": name, "caption": caption_for(tags, rng), "tags": tags,
            "licence": COLLECTIONS[cand.collection][2], "source": cand.source,
            "title": piece.title}


def _check(cfg: DemoConfig) -> None:
    unknown = [c for c in cfg.collections if c not in COLLECTIONS]
    if unknown or not cfg.collections:
        raise ConfigError(f"'demo.collections': unknown or empty {unknown or []}"
                          f" (known: {', '.join(COLLECTIONS)})")
    for name in ("num_pieces", "max_seconds", "sample_rate"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"'demo.{name}' must be positive")


def run(cfg: DemoConfig, out: Path) -> dict:
    """Render ``cfg.num_pieces`` pieces into ``out``; returns a summary.

    Collections take turns in config order; within each, candidates come in a
    seeded permutation of the sorted list. A piece that fails to parse or render
    is logged and replaced by the collection's next candidate."""
    _check(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    pools = {c: candidates(c) for c in cfg.collections}
    orders = {c: iter(rng.permutation(len(p)).tolist()) for c, p in pools.items()}
    sf2 = soundfont_path().read_bytes()
    records, skipped = [], 0
    for slot in tqdm(range(cfg.num_pieces), desc="demo", unit="piece", disable=None):
        coll = cfg.collections[slot % len(cfg.collections)]
        while True:
            i = next(orders[coll], None)
            if i is None:
                raise RuntimeError(f"collection {coll!r} ran out of renderable pieces")
            try:
                records.append(render(pools[coll][i], slot, cfg, sf2, out))
                break
            except Exception as e:  # a bad score must not stop the corpus
                skipped += 1
                log.warning("skipping %s: %s: %s", pools[coll][i].source, type(e).__name__, e)
    _write_captions(out, records)
    return {"pieces": len(records), "seconds": len(records) * cfg.max_seconds,
            "skipped": skipped, "by_collection": {
                c: sum(r["source"].startswith(f"music21:{c}/") for r in records)
                for c in cfg.collections}}


def _write_captions(out: Path, records: list[dict]) -> None:
    records = sorted(records, key=lambda r: r["path"])
    keep = {r["path"] for r in records}
    for stale in sorted(out.glob("[0-9][0-9][0-9][0-9]-*.flac")):
        if stale.name not in keep:  # left by an earlier run with another config
            stale.unlink()
    tmp = out / ".captions.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "captions.jsonl")


def main(argv: list[str] | None = None) -> int:
    """``cantus demo``: 0 done, 2 a bad params key (one line on stderr naming it)."""
    ap = argparse.ArgumentParser(prog="cantus demo", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (section 'demo')")
    ap.add_argument("--out", default="data/demo", help="output folder")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(load_section(args.params, "demo", DemoConfig), Path(args.out))
    except ConfigError as e:  # an unknown key, or a value run() refuses (a collection)
        print(f"cantus demo: configuration error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
