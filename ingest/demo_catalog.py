"""What the demo corpus chooses from, and the words it describes a rendering with.

Used by ``cantus.ingest.demo``: the music21 collections (genre, composer,
licence, tempo range), General MIDI scorings for part music and for melodies,
dance forms and Essen origins, key spellings, and the seeded caption writer
(tags dict -> one English sentence). Nothing here reads files or renders audio.
"""

from __future__ import annotations

import numpy as np

PD = "public domain (music21 corpus)"
ESSEN_LICENCE = "non-commercial use (Essen folksong collection, music21 corpus)"
# collection -> genre, composer, licence, beat-BPM range (the time signature's beat)
COLLECTIONS = {
    "bach": ("chorale", "Johann Sebastian Bach", PD, (54, 100)),
    "palestrina": ("renaissance polyphony", "Giovanni Pierluigi da Palestrina", PD, (44, 92)),
    "essenFolksong": ("folk song", None, ESSEN_LICENCE, (60, 132)),
    "ryansMammoth": ("irish folk", None, PD, (72, 144)),
    "oneills1850": ("irish folk", None, PD, (72, 144)),
}

# name -> (texture, voices top to bottom as (instrument, GM program)); parts map onto voices
POLY_SCORINGS = {
    "string quartet": ("ensemble", (("violin", 40), ("violin", 40), ("viola", 41),
                                    ("cello", 42))),
    "brass quartet": ("ensemble", (("trumpet", 56), ("trumpet", 56), ("french horn", 60),
                                   ("trombone", 57))),
    "woodwind quartet": ("ensemble", (("flute", 73), ("oboe", 68), ("clarinet", 71),
                                      ("bassoon", 70))),
    "choir": ("ensemble", (("choir", 52),)),
    "recorder consort": ("ensemble", (("recorder", 74),)),
    "organ": ("solo", (("church organ", 19),)),
    "piano": ("solo", (("piano", 0),)),
    "harpsichord": ("solo", (("harpsichord", 6),)),
    "guitar": ("solo", (("guitar", 24),)),
    "harp": ("solo", (("harp", 46),)),
}
IRISH_MELODY = {"fiddle": 110, "flute": 73, "tin whistle": 78, "accordion": 21, "piano": 0,
                "harp": 46, "banjo": 105, "clarinet": 71, "harmonica": 22, "guitar": 24}
FOLK_MELODY = {"piano": 0, "flute": 73, "clarinet": 71, "violin": 40, "accordion": 21,
               "recorder": 74, "oboe": 68, "guitar": 24, "harp": 46, "voice": 53}
DUO_PROBABILITY = 0.3
ENSEMBLE_WORDS = ("quartet", "choir", "consort")

FORMS = {"reel": "reel", "double jig": "jig", "slip jig": "slip jig", "slipjig": "slip jig",
         "jig": "jig", "hornpipe": "hornpipe", "strathspey": "strathspey", "clog": "clog",
         "fling": "highland fling", "polka": "polka", "waltz": "waltz", "march": "march",
         "air": "air"}
COUNTRIES = {"Deutschland": "German", "China": "Chinese", "Luxemburg": "Luxembourgish",
             "Lothringen": "Lorraine", "Frankreich": "French", "Elsass": "Alsatian",
             "Polen": "Polish", "Jugoslawien": "Yugoslav", "Schweiz": "Swiss",
             "Oesterreich": "Austrian", "Niederlande": "Dutch", "Irland": "Irish",
             "Ungarn": "Hungarian", "Rumaenien": "Romanian", "Boehmen": "Bohemian",
             "Russland": "Russian", "Italien": "Italian", "Schweden": "Swedish",
             "Daenemark": "Danish", "Island": "Icelandic"}
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
MINOR_MODES = ("minor", "aeolian", "dorian", "phrygian", "locrian")


def key_name(tonic_pc: int, mode: str, transpose: int = 0) -> str:
    """'A minor' moved up 3 semitones -> 'C minor' (common spellings, no double sharps)."""
    pc = (tonic_pc + transpose) % 12
    return f"{(MINOR_NAMES if mode == 'minor' else MAJOR_NAMES)[pc]} {mode}"


def tempo_word(bpm: int) -> str:
    """slow / moderate / fast from beats per minute."""
    return "slow" if bpm < 76 else "moderate" if bpm < 108 else "fast"


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def caption_for(tags: dict, rng: np.random.Generator) -> str:
    """A caption written from the tags; the wording is drawn from rng."""
    genre, form = tags["genre"], tags["form"]
    if genre == "chorale":
        pieces = ["Bach chorale", "chorale by J. S. Bach", "Lutheran chorale harmonised by Bach"]
    elif genre == "renaissance polyphony":
        pieces = [f"{form} by Palestrina", "piece of Renaissance polyphony by Palestrina",
                  "Renaissance mass movement"]
    else:
        people = genre.split()[0].capitalize()
        noun = form or ("folk song" if genre.endswith("song") else "folk tune")
        pieces = [f"{people} {noun}", f"traditional {people} {noun}"]
    piece = str(rng.choice(pieces))
    tempo, tonality, scoring = tags["tempo"], tags["key"], tags["scoring"]
    ensemble = any(w in scoring for w in ENSEMBLE_WORDS)
    by = f"by {_a(scoring)}" if ensemble else f"on {scoring}"
    solo = f"solo {scoring}" if tags["texture"] == "solo" else scoring
    templates = [f"{_a(tempo)} {piece} for {scoring} in {tonality}",
                 f"{tempo} {piece} played {by}, in {tonality}",
                 f"{solo}: {_a(tempo)} {piece} in {tonality}",
                 f"{scoring} rendition of {_a(tempo)} {piece} in {tonality},"
                 f" {tags['tempo_bpm']} bpm",
                 f"{_a(piece)} in {tonality} performed {by}, {tempo} tempo"]
    return str(templates[int(rng.integers(len(templates)))])
