"""The token-shard contract: arrays round-trip, plain webdataset reads them, mismatches refused."""

import json

import numpy as np
import pytest
import webdataset as wds

from cantus import shards
from cantus.tokens import ManifestMismatch, check_manifest, iter_token_samples, sample_fields


def test_token_shard_round_trip_and_webdataset_decode(tmp_path):
    rng = np.random.default_rng(0)
    toks = {"acoustic": rng.integers(0, 1024, (12, 500)).astype(np.uint16),
            "semantic": rng.integers(0, 1024, 250).astype(np.uint16),
            "mulan": rng.integers(0, 1024, 12).astype(np.uint16)}
    shards.write_shard(tmp_path / "train-000000.tar",
                       [("abc123", sample_fields(toks, {"caption": "x"}))])
    (key, item), = list(iter_token_samples(tmp_path / "train-000000.tar"))
    assert key == "abc123" and item["meta"] == {"caption": "x"}
    for f, a in toks.items():
        assert item[f].dtype == np.uint16 and np.array_equal(item[f], a)
    s = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode()))
    assert np.array_equal(s["acoustic.npy"], toks["acoustic"]) and s["json"]["caption"] == "x"


def test_manifest_mismatch_is_refused_naming_what_differs(tmp_path):
    manifest = {"tokenizers": {"acoustic": {"checkpoint_hash": "aa", "hop": 480},
                               "semantic": {"centroid_hash": "cc", "layer": 7}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert check_manifest(tmp_path, {"acoustic": {"hop": 480}})["tokenizers"]
    with pytest.raises(ManifestMismatch) as e:
        check_manifest(tmp_path, {"acoustic": {"checkpoint_hash": "bb"},
                                  "semantic": {"layer": 7, "k": 1024}})
    msg = str(e.value)
    assert "acoustic.checkpoint_hash: shards have 'aa', run expects 'bb'" in msg
    assert "semantic.k: missing" in msg
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        check_manifest(tmp_path / "nowhere", {})
