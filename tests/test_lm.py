"""LM stages: layouts and offsets, crops aligned across rates, the model, the manifest check."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from cantus.config import ConfigError, from_dict
from cantus.tokens import ManifestMismatch, iter_token_samples
from cantus.train.data import crop, fixed_crops, batched
from cantus.train.layout import STAGES, Layout, dedup, stage_spec
from cantus.train.model import GPTConfig, Transformer, tiny
from cantus.train.run import Inputs, lr_at, run, stage_loss
from cantus.train.stage import LMConfig, load_lm
from cantus.train.synthetic import write_synthetic_tokens

from conftest import ROOT

K = 1024


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(seed=0, seconds=2.0):
    rng = np.random.default_rng(seed)
    return {"acoustic": rng.integers(0, K, (12, int(50 * seconds))).astype(np.uint16),
            "semantic": np.repeat(rng.integers(0, K, int(12.5 * seconds)), 2).astype(np.uint16),
            "mulan": rng.integers(0, K, 12).astype(np.uint16)}


@pytest.mark.parametrize("stage", STAGES)
def test_layout_ids_in_range_blocks_and_target_mask(stage):
    layout = Layout(stage_spec(stage), K, 2.0, dedup_semantic=stage != "fine")
    toks = tokens()
    ids, block, target = layout.encode(toks)
    assert ids.shape == block.shape == target.shape == (layout.max_len,)
    assert ids.min() >= 0 and ids.max() < layout.vocab_size
    real = block >= 0
    # every real id lies in its own block; pads are pad and never targets
    assert np.all(ids[real] // K == block[real])
    assert np.all(ids[~real] == layout.pad_id) and not target[~real].any()
    # dedup shortens the semantic part of coarse: count what came through
    n_cond = {"semantic": 12, "coarse": 12 + dedup(toks["semantic"]).shape[0],
              "fine": 4 * 100}[stage]
    assert not target[:n_cond].any() and target[n_cond:real.sum()].all()
    expected = {"semantic": dedup(toks["semantic"]), "coarse": toks["acoustic"][:4],
                "fine": toks["acoustic"][4:]}[stage]
    assert np.array_equal(layout.decode(ids[target]), expected)
    tgt_blocks = block[target]
    assert [layout.next_block(i) for i in range(len(tgt_blocks))] == tgt_blocks.tolist()
    assert set(np.unique(tgt_blocks)) == set(layout.target_blocks.tolist())


def test_acoustic_flattened_row_major_over_time_then_level():
    layout = Layout(stage_spec("fine"), K, 0.04)  # 2 acoustic frames
    a = np.arange(24, dtype=np.uint16).reshape(12, 2)  # a[level, t] = 2 level + t
    ids, block, _ = layout.encode({"acoustic": a})
    codes = ids - block * K
    # t0: levels 0..3 (cond) ... then t0 levels 4..11, t1 levels 4..11 (target)
    assert codes.tolist() == [0, 2, 4, 6, 1, 3, 5, 7] + [8, 10, 12, 14, 16, 18, 20, 22,
                                                        9, 11, 13, 15, 17, 19, 21, 23]
    assert block.tolist() == [0, 1, 2, 3] * 2 + list(range(4, 12)) * 2


def test_conditioning_dropout_nulls_mulan_only():
    layout = Layout(stage_spec("coarse"), K, 2.0)
    toks = tokens()
    kept, _, t1 = layout.encode(toks)
    dropped, _, t2 = layout.encode(toks, drop_cond=True)
    assert np.all(dropped[:12] == layout.null_id)
    assert np.array_equal(kept[12:], dropped[12:]) and np.array_equal(t1, t2)
    assert np.all(layout.prefix(toks, drop_cond=True)[:12] == layout.null_id)
    assert np.array_equal(layout.prefix(toks), kept[:layout.n_cond])
    with pytest.raises(ValueError, match="outside"):
        layout.encode({**toks, "mulan": np.full(12, K, np.uint16)})


def test_crop_takes_the_same_seconds_at_both_rates():
    n_sem = 500
    toks = {"semantic": np.arange(n_sem, dtype=np.uint16),
            "acoustic": np.tile(np.arange(2 * n_sem + 1, dtype=np.uint16), (12, 1))}
    for seed in range(20):
        c = crop(toks, 3.0, random.Random(seed))
        assert c["semantic"].shape == (75,) and c["acoustic"].shape == (12, 150)
        assert c["acoustic"][0, 0] == 2 * c["semantic"][0]  # same offset in seconds
        assert c["acoustic"][0, -1] == 2 * c["semantic"][-1] + 1
    short = crop({"semantic": toks["semantic"][:10]}, 3.0, random.Random(0))
    assert short["semantic"].shape == (10,)


@pytest.mark.parametrize("position", ["rope", "t5"])
def test_kv_cache_generation_matches_full_forward(position):
    torch.manual_seed(0)
    model = Transformer(GPTConfig(**{**dataclasses.asdict(tiny()), "position": position},
                                  vocab_size=100)).eval()
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        steps = [model(x[:, :5], cache=cache)]
        steps += [model(x[:, i:i + 1], cache=cache) for i in range(5, 9)]
        steps.append(model(x[:, 9:], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_tiny_model_overfits_one_batch(tmp_path):
    folder = write_synthetic_tokens(tmp_path / "tok", chunks=6, seconds=4.0, valid=2,
                                    shards_train=1)
    layout = Layout(stage_spec("coarse"), K, 0.5, dedup_semantic=True)
    batch = next(batched(fixed_crops([str(folder / "train-000000.tar")], layout, 4), 4))
    torch.manual_seed(0)
    model = Transformer(GPTConfig(**dataclasses.asdict(tiny()), vocab_size=layout.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        total, n = stage_loss(model, model.embed.weight, batch, layout)
        loss = total / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 6.5  # ~ log(1024): it starts knowing nothing
    assert losses[-1] < 0.3 * losses[0]


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = load_lm(ROOT / "params.yaml").semantic.train
    t = dataclasses.replace(cfg, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, t) == pytest.approx(0.1)


def test_params_section_loads_and_rejects_unknown_keys():
    raw = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())["lm"]
    cfg = from_dict(LMConfig, raw, prefix="lm")
    assert cfg.coarse.model.layers >= 1 and cfg.tokens.coarse_levels == 4
    raw["fine"]["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="lm.fine.train.stepz"):
        from_dict(LMConfig, raw, prefix="lm")


def test_manifest_mismatch_is_refused(tmp_path):
    folder = write_synthetic_tokens(tmp_path / "tok", chunks=4, seconds=2.0, valid=1,
                                    shards_train=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizers"]["acoustic"]["n_q"] = 8
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_lm(ROOT / "params.yaml")
    with pytest.raises(ManifestMismatch, match="acoustic.n_q: shards have 8"):
        run(cfg, "fine", Inputs(str(folder), str(tmp_path / "ck")), tmp_path / "out")
    with pytest.raises(ManifestMismatch, match="semantic.checkpoint_hash"):
        run(cfg, "fine", Inputs(str(folder), str(tmp_path / "ck"),
                                expect={"semantic": {"checkpoint_hash": "abc"}}), None)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()


SIZES = {"acoustic": 16, "semantic": 8, "mulan": 4}


def small_tokens(seed=0, seconds=2.0):
    rng = np.random.default_rng(seed)
    return {"acoustic": rng.integers(0, 16, (12, int(50 * seconds))).astype(np.uint16),
            "semantic": rng.integers(0, 8, int(25 * seconds)).astype(np.uint16),
            "mulan": rng.integers(0, 4, 12).astype(np.uint16)}


def test_each_field_has_its_own_codebook_size():
    layout = Layout(stage_spec("coarse"), SIZES, 2.0)
    # blocks in part order: 12 MuLan levels of 4, the semantic block of 8, 4 acoustic of 16
    assert layout.null_id == 12 * 4 + 8 + 4 * 16 and layout.vocab_size == 128  # 122, to 64s
    widths = [layout.block_range(b)[1] - layout.block_range(b)[0]
              for b in range(len(layout.blocks))]
    assert widths == [SIZES[f] for f, _ in layout.blocks]
    toks = small_tokens()
    ids, block, target = layout.encode(toks)
    real = block >= 0
    lo = layout.offsets[block[real]]
    hi = layout.offsets[block[real] + 1]
    assert np.all((ids[real] >= lo) & (ids[real] < hi))
    assert np.array_equal(layout.decode(ids[target]), toks["acoustic"][:4])
    with pytest.raises(ValueError, match=r"semantic tokens outside \[0, 8\)"):
        layout.encode({**toks, "semantic": np.full(50, 8, np.uint16)})
    with pytest.raises(ValueError, match="sizes.semantic is 1: a codebook holds"):
        Layout(stage_spec("coarse"), {**SIZES, "semantic": 1}, 2.0)


def test_loss_and_sampling_stay_in_each_blocks_own_codes():
    from cantus.generate.sample import SampleOptions, sample_ids

    layout = Layout(stage_spec("coarse"), SIZES, 0.5)
    torch.manual_seed(0)
    model = Transformer(GPTConfig(**dataclasses.asdict(tiny()), vocab_size=layout.vocab_size))
    ids, block, target = (torch.from_numpy(a)[None] for a in layout.encode(small_tokens(1, 0.5)))
    batch = {"ids": ids, "block": block, "target": target}
    total, n = stage_loss(model, model.embed.weight, batch, layout)
    # the same loss by hand: each target scored over its block's K codes only
    h = model(ids[:, :-1], head=False)[0]
    want = 0.0
    for i in torch.nonzero(target[0, 1:]).flatten().tolist():
        lo, hi = layout.block_range(int(block[0, i + 1]))
        logp = torch.log_softmax(h[i] @ model.embed.weight[lo:hi].T, -1)
        want -= float(logp[int(ids[0, i + 1]) - lo])
    assert int(n) == int(target.sum()) and float(total) == pytest.approx(want, rel=1e-4)
    prefix = torch.from_numpy(layout.prefix(small_tokens(2, 0.5)))[None]
    with torch.no_grad():
        out = sample_ids(model.eval(), layout, prefix, 4 * 5, SampleOptions(),
                         torch.Generator().manual_seed(0))
    blocks = [layout.next_block(i) for i in range(20)]
    assert all(layout.block_range(b)[0] <= int(x) < layout.block_range(b)[1]
               for b, x in zip(blocks, out[0]))
    assert layout.decode(out[0].numpy()).max() < 16


def test_trainer_takes_each_fields_size_from_the_manifest(tmp_path):
    folder = write_synthetic_tokens(tmp_path / "tok", chunks=4, seconds=2.0, valid=1,
                                    shards_train=1, k=16, states=8)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizers"]["semantic"]["k"] = 32
    (folder / "manifest.json").write_text(json.dumps(manifest))
    raw = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())["lm"]
    raw["semantic"]["train"].update(steps=2, warmup_steps=0, valid_every=2, valid_samples=2,
                                    unigram_samples=4, batch_size=2)
    raw["semantic"]["model"].update(layers=1, dim=32, ffn=64, heads=2)
    cfg = from_dict(LMConfig, raw, prefix="lm")
    run(cfg, "semantic", Inputs(str(folder), str(tmp_path / "ck")), tmp_path / "out")
    from cantus.train.stage import load_stage

    _, layout = load_stage(tmp_path / "out")
    assert layout.sizes == {"acoustic": 16, "semantic": 32, "mulan": 16}
    top = max(int(t["semantic"].max()) for p in sorted(folder.glob("*.tar"))
              for _, t in iter_token_samples(p))
    assert top >= 2
    manifest["tokenizers"]["semantic"]["k"] = top  # one code the shards hold is now outside
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"semantic tokens outside \[0, {top}\)"):
        run(cfg, "semantic", Inputs(str(folder), str(tmp_path / "ck2")), tmp_path / "out2")


def test_aligned_conditioning_gives_each_position_its_next_tokens_frame():
    k = 8
    lay = Layout(stage_spec("coarse"), k, 0.08, aligned=True)  # 2 semantic, 4 acoustic frames
    assert lay.cond_width == 13
    toks = {"mulan": np.arange(12, dtype=np.uint16) % k, "semantic": np.array([3, 5], np.uint16),
            "acoustic": np.tile(np.arange(4, dtype=np.uint16), (12, 1))}
    ids, block, target = lay.encode(toks)
    cond = lay.aligned_cond(toks)
    assert cond.shape == (lay.max_len, 13)
    mulan_ids = ids[:12]
    first = lay.n_cond - 1                                   # predicts the first target
    assert (cond[:first] == -1).all() and (cond[first + 16:] == -1).all()
    sem_ids = ids[12:14]
    for j in range(16):                                      # 4 frames x 4 levels
        row = cond[first + j]
        assert np.array_equal(row[:12], mulan_ids)
        assert row[12] == sem_ids[(j // 4) // 2]             # 50 Hz frame -> 25 Hz token
    dropped = lay.aligned_cond(toks, drop_cond=True)
    assert (dropped[first:first + 16, :12] == lay.null_id).all()
    assert np.array_equal(dropped[first:first + 16, 12], cond[first:first + 16, 12])
    fine = Layout(stage_spec("fine"), k, 0.04, aligned=True)  # 2 frames
    a = np.arange(24, dtype=np.uint16).reshape(12, 2) % k
    fc = fine.aligned_cond({"acoustic": a})
    fids = fine.encode({"acoustic": a})[0]
    for j in range(16):                                      # 2 frames x 8 fine levels
        frame = j // 8
        assert np.array_equal(fc[fine.n_cond - 1 + j], fids[frame * 4:frame * 4 + 4])
    assert Layout(stage_spec("fine"), k, 0.04).cond_width == 0


def test_aligned_conditioning_refuses_deduplicated_semantic_conditioning():
    with pytest.raises(ValueError, match="time-aligned"):
        Layout(stage_spec("coarse"), K, 1.0, dedup_semantic=True, aligned=True)
    Layout(stage_spec("semantic"), K, 1.0, dedup_semantic=True, aligned=True)  # MuLan: global
    cfg = load_lm(ROOT / "params.yaml")
    from cantus.train.stage import make_layout
    bad = dataclasses.replace(cfg.coarse, dedup_semantic=True, aligned_cond=True)
    with pytest.raises(ConfigError, match="lm.coarse.aligned_cond"):
        make_layout(cfg.tokens, "coarse", bad)


def test_model_adds_aligned_conditioning_and_checks_its_shape():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, cond_width=3, **dataclasses.asdict(tiny()))
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 60, (2, 5))
    none = torch.full((2, 5, 3), -1)
    some = none.clone()
    some[:, 2] = torch.tensor([4, 7, -1])
    with torch.no_grad():
        base = model(ids, cond=none)
        moved = model(ids, cond=some)
        plain = Transformer(GPTConfig(vocab_size=64, **dataclasses.asdict(tiny())))
        plain.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith("cond_embed")})
        assert torch.allclose(plain.eval()(ids), base, atol=1e-6)  # -1 adds nothing
    assert torch.allclose(moved[:, :2], base[:, :2], atol=1e-6)    # causal: earlier unchanged
    assert not torch.allclose(moved[:, 2], base[:, 2])
    with pytest.raises(ValueError, match=r"int64\[B, T, 3\]"):
        model(ids)
    with pytest.raises(ValueError, match="no aligned conditioning"):
        plain(ids, cond=none)
