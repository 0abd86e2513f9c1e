"""World-fidelity gauges (jsae.protocol.fidelity) on tiny random toy models of the real classes: values
checked against a direct transformers forward, not just keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jsae.world.models import MODEL_NAMES, build_model, build_processor, save_toy_vlm
from jsae.world.processors import CAPTION_PROMPT, build_tokenizer


@pytest.fixture(scope="module", params=MODEL_NAMES)
def tiny_dir(request, tmp_path_factory):
    tok = build_tokenizer()
    model = build_model(request.param, tok, "tiny", seed=1)
    return request.param, save_toy_vlm(model, build_processor(request.param, tok), tmp_path_factory.mktemp("m") / request.param)


def test_logit_lens_and_pools_match_a_direct_forward(tiny_dir):
    from jsae.protocol.fidelity import lens_table, pair_text, read_world
    from jsae.vlm import load_vlm
    from jsae.world import grammar
    from jsae.world.data import iter_world
    from jsae.world.scenes import TYPES

    name, d = tiny_dir
    vlm = load_vlm(str(d))
    scenes = [s for s, _ in iter_world("validation", 6, 0)]
    read = read_world(vlm, scenes, CAPTION_PROMPT, batch_size=4, progress=False)
    model, proc, adapter = vlm
    hf = adapter.hf_model
    tok = proc.tokenizer
    type_ids = [tok.convert_tokens_to_ids(t) for t in TYPES]
    rows = []
    pools = []
    for i, s in enumerate(scenes):  # one image at a time, straight through transformers
        enc = adapter.complete_inputs(proc(images=[s.image], text=[pair_text(vlm, grammar.caption(s.objects, 0), CAPTION_PROMPT)],
                                           return_tensors="pt"))
        with torch.no_grad():
            hs = hf(**enc, output_hidden_states=True).hidden_states[1][0]  # the output of decoder layer 0
        img = (enc["input_ids"][0] == adapter.image_token_id).nonzero().flatten()
        pools.append(hs[img].mean(0))
        cover = np.stack([s.patch_mask(k, 6) for k in range(len(s.objects))]).reshape(len(s.objects), -1)
        with torch.no_grad():
            logits = hf.lm_head(adapter.language_model.norm(hs[img]))[:, :len(tok)]
        for j in range(len(img)):  # image tokens are the 6×6 patches in reading order in both toy families
            if cover[:, j].sum() == 1:
                t = TYPES.index(s.objects[int(cover[:, j].argmax())].name)
                rank = int((logits[j] > logits[j, type_ids[t]]).sum()) + 1
                rows.append((i, rank, int(int(logits[j, type_ids].argmax()) == t)))
    rows = np.array(rows)
    got = read["lens_image"][0]
    assert len(got) == len(rows) > 0 and read["n_single_object_tokens"] == len(rows)
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], rows[np.lexsort(rows.T[::-1])])
    torch.testing.assert_close(read["vision_pools"][0], torch.stack(pools), atol=1e-4, rtol=1e-4)
    table = lens_table(got, len(scenes), read["vocab"])
    assert table["top5"]["value"] == pytest.approx(float(np.mean(rows[:, 1] <= 5)), abs=1e-4)
    assert table["right_of_six"]["value"] == pytest.approx(float(np.mean(rows[:, 2])), abs=1e-4)
    assert table["median_rank"] == float(np.median(rows[:, 1]))
    lo, hi = table["right_of_six"]["ci"]
    assert lo <= table["right_of_six"]["value"] <= hi
    assert table["chance"] == {"top1": round(1 / len(tok), 4), "top5": round(5 / len(tok), 4), "right_of_six": 0.1667,
                               "median_rank": (len(tok) + 1) / 2}
    # the caption reference reads the positions before each type word: one per object of a canonical caption
    assert len(read["lens_caption"][0]) == sum(len(s.objects) for s in scenes)


def test_count_matched_oracle_removes_a_confound():
    """A state that carries the concept (a) and the scene's object count (b), where scenes with the concept hold
    more objects: the plain difference of means mixes b in; the count-matched one is a alone, and equals the
    weighted within-stratum differences computed by hand."""
    from jsae.protocol.sweep import oracle_direction

    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    count = torch.tensor([1, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    present = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1, 1, 1])
    noise = torch.zeros(10, 3)
    noise[:, 2] = torch.arange(10.0)  # a third direction that differs inside strata
    v = present[:, None] * a + count[:, None] * b + noise
    plain = oracle_direction(v, present)
    assert plain[1] > 0.5  # the count leaks into the plain oracle
    matched = oracle_direction(v, present, count)
    by_hand, weight = torch.zeros(3), 0.0
    for k in (1, 2, 3):
        y, n = (present == 1) & (count == k), (present == 0) & (count == k)
        w = int(y.sum()) * int(n.sum()) / int((count == k).sum())
        by_hand += w * (v[y].mean(0) - v[n].mean(0))
        weight += w
    torch.testing.assert_close(matched, by_hand / weight)
    assert matched[0] == pytest.approx(1.0) and matched[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no stratum"):
        oracle_direction(v, present, torch.arange(10))
    with pytest.raises(ValueError, match="one value per pair"):
        oracle_direction(v, present, count[:5])


def test_r50_is_the_log_interpolated_half_point():
    from jsae.protocol.fidelity import _r50_with_ci

    grid = [0.5, 1.0, 2.0, 4.0]
    effect = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], float)
    r = _r50_with_ci(grid, effect)
    assert r["r50"] == pytest.approx(math.sqrt(2), abs=1e-3) and r["max_effect"] == 1.0
    never = _r50_with_ci(grid, np.zeros((4, 4)))
    assert never["r50"] is None and never["ci"] == [None, None]


def test_world_fidelity_end_to_end_and_targets(tiny_dir):
    """The whole gauge on a random tiny model: oracle cosines from the pools, both oracles steered at both
    position sets, and a random model meets none of the targets."""
    from jsae.protocol.fidelity import world_fidelity
    from jsae.report.markdown import fidelity_table

    name, d = tiny_dir
    r = world_fidelity(str(d), n_images=24, n_steer=2, n_captions=4, ratios=(1.0, 8.0), layers=[0, 1], progress=False)
    assert r["n_layers"] == 2 and set(r["oracles"]) == {"0", "1"}
    assert set(r["oracles"]["0"]) == {"cosine", "cosine_matched", "image", "generated"}
    assert "reason" in r["oracles"]["1"]["image"]  # the last layer's prompt states are read by nothing
    img = r["oracles"]["0"]["image"]
    assert set(img) == {"oracle", "text-oracle", "oracle-matched", "text-oracle-matched"}
    for c, rec in img["text-oracle"].items():
        assert (rec["r50"] is None) == (rec["max_effect"] < 0.5)
        assert -1.0 <= r["oracles"]["0"]["cosine"][c] <= 1.0
    assert set(r["oracles"]["0"]["cosine_matched"]) == set(img["text-oracle-matched"])
    s = r["summary"]
    per = s["steering_per_layer"]["0"]
    assert per["n_types_matched"] == len(img["text-oracle-matched"])
    assert per["mean_cosine_matched"] == pytest.approx(np.mean(list(r["oracles"]["0"]["cosine_matched"].values())), abs=1e-3)
    assert isinstance(s["steering_target_matched"], bool)
    assert not s["lens_top5_target"] and not s["captions_target"]
    assert s["type_colour"] == r["captions"]["object_accuracy"]
    table = fidelity_table(r)
    assert table.count("\n") == 3 and "n/a" in table.splitlines()[-1] and "count-matched" in table.splitlines()[0]


def test_fidelity_command_checks_its_inputs_and_records_quality(tiny_dir, tmp_path):
    """`jsae world fidelity`: one-line errors for a model that is neither a toy name nor a directory and for an
    --out that is a directory; on a model directory it prints the table and records the result in quality.json."""
    import json
    import shutil

    from typer.testing import CliRunner

    from jsae.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["world", "fidelity", "--model", "nope"])
    assert r.exit_code != 0 and "neither a toy model" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["world", "fidelity", "--model", "llava", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "is a directory" in r.output
    name, d = tiny_dir
    mine = tmp_path / name
    shutil.copytree(d, mine)
    r = runner.invoke(app, ["world", "fidelity", "--model", str(mine), "--n-images", "12", "--no-steering",
                            "--n-captions", "0", "--write-quality", "--out", str(tmp_path / "f.json")])
    assert r.exit_code == 0, r.output
    q = json.loads((mine / "quality.json").read_text())["fidelity"]
    assert q == json.loads((tmp_path / "f.json").read_text())
    assert q["n_images"] == 12 and set(q["logit_lens"]["image_tokens"]) == {"0", "1"} and "oracles" not in q
    assert "| layer |" in r.output


def test_run_report_states_the_world_fidelity_of_the_shipped_model():
    """A run's report.md quotes the shipped model's fidelity summary (quality.json) with the plain and the
    count-matched steering layers, and says whether the world can test text-derived directions at image tokens."""
    import json
    from pathlib import Path

    from jsae.protocol.stages import _toy_quality
    from jsae.report.markdown import protocol_report

    m = json.loads((Path(__file__).parents[1] / "benchmarks/results/sweep/qwen3-vl-moe/metrics.json").read_text())
    q = _toy_quality("qwen3-vl-moe")
    fid = q["fidelity"]
    m["model_quality"] = q
    text = protocol_report(m)
    plain = ", ".join(fid["steering_target_layers"]) or "none"
    matched = ", ".join(fid["steering_target_layers_matched"]) or "none"
    assert f"oracle at layers {plain} (with both oracles taken within scenes of equal object count: layers {matched})" in text
    can = fid["lens_top5_target"] and fid["lens_right_of_six_target"] and (fid["steering_target"] or fid["steering_target_matched"])
    assert ("can test text-derived directions" in text) == bool(can)
    fid.update(steering_target=False, steering_target_matched=False)
    assert "cannot fairly test" in protocol_report(m)
