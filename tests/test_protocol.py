"""Protocol pieces that need no VLM: methods on equal budget, the separate-SAE alignment, the world's
mention / fluency judges, and the report files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jsae.world.concepts import fluent, mentions

from jsae.protocol.methods import permute_text_branch, train_methods

from jsae.protocol.summary import model_layer_interaction, summarise_curves
from jsae.protocol.sweep import Curve
from jsae.report.browser import feature_browser
from jsae.report.plots import plot_dose_response


def _pairs(n=512, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, 6, generator=g) < 0.2).float() * torch.rand(n, 6, generator=g)
    return a @ torch.randn(6, d, generator=g), a @ torch.randn(6, d, generator=g)


def test_train_methods_equal_budget_and_separate_alignment(monkeypatch):
    from sae_lens.training.sae_trainer import SAETrainer

    from jsae.training import JointSAETrainer

    # record every optimiser step of both trainers: batch size and learning rate (the real trainers run)
    seen: dict[str, list[tuple[int, float]]] = {"jsae": [], "saelens": []}
    jsae_step, saelens_step = JointSAETrainer._train_step, SAETrainer._train_step

    def jsae_rec(self, vision, text):
        seen["jsae"].append((vision.shape[0], self.cfg.lr))
        return jsae_step(self, vision, text)

    def saelens_rec(self, sae, sae_in):
        seen["saelens"].append((sae_in.shape[0], self.cfg.lr))
        return saelens_step(self, sae=sae, sae_in=sae_in)

    monkeypatch.setattr(JointSAETrainer, "_train_step", jsae_rec)
    monkeypatch.setattr(SAETrainer, "_train_step", saelens_rec)
    v, t = _pairs()
    methods = train_methods(v, t, layer=3, d_sae=24, steps=60, batch_size=64, lr=3e-3, seed=0,
                            methods=("jsae", "jsae-none", "separate", "saelens-topk"), metadata={"model_name": "x"}, k=4)
    assert list(methods) == ["jsae", "jsae-none", "separate", "saelens-topk"]
    # the same budget: width, steps, batch and learning rate ("separate" reuses the jsae-none training)
    assert {m.sae.cfg.d_sae for m in methods.values()} == {24}
    assert seen["jsae"] == [(64, 3e-3)] * 120  # jsae and jsae-none, 60 steps each
    assert seen["saelens"] == [(64, 3e-3)] * 60
    from sae_lens import SAE

    assert isinstance(methods["saelens-topk"].sae, SAE) and not methods["saelens-topk"].joint
    assert methods["jsae"].sae.cfg.metadata.layer == 3
    none, sep = methods["jsae-none"].sae, methods["separate"].sae
    # the separate baseline is the ablation's weights with the text latents re-ordered: same reconstructions
    torch.testing.assert_close(sep(t, "text"), none(t, "text"), atol=1e-5, rtol=1e-5)
    assert torch.equal(sep.W_dec_of("vision"), none.W_dec_of("vision"))
    zs, zn = sep.encode(t, "text"), none.encode(t, "text")
    assert sorted(zs.sum(0).tolist()) == pytest.approx(sorted(zn.sum(0).tolist()), rel=1e-5)
    # after matching, paired codes agree at least as much as unmatched ones
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1).nan_to_num().mean()  # noqa: E731
    assert cos(sep.encode(v, "vision"), zs) >= cos(none.encode(v, "vision"), zn)
    # the steering direction: the sum of the features' unit decoder rows (the SAELens SAE's only decoder; a joint
    # SAE's text decoder by default, its vision decoder on request)
    unit = lambda W, rows: sum(W[r] / W[r].norm() for r in rows)  # noqa: E731
    d = methods["saelens-topk"].steer_direction([0, 1])
    torch.testing.assert_close(d, unit(methods["saelens-topk"].sae.W_dec.detach(), [0, 1]))
    j = methods["jsae"].sae
    torch.testing.assert_close(methods["jsae"].steer_direction([2, 5]), unit(j.W_dec_of("text").detach(), [2, 5]))
    torch.testing.assert_close(methods["jsae"].steer_direction([2, 5], "vision"), unit(j.W_dec_of("vision").detach(), [2, 5]))
    assert not torch.allclose(methods["jsae"].steer_direction([2, 5]), methods["jsae"].steer_direction([2, 5], "vision"))


def test_train_methods_width_from_the_expansion_factor_and_revival(monkeypatch):
    """``expansion_factor`` × d_in gives every method its width; revival resamples the JSAEs' dead latents on the
    schedule (32 steps: every 4 steps while 4 more follow, 7 times) and trains the TopK baseline with AuxK."""
    from jsae.protocol.methods import resolve_d_sae, revival_schedule
    from jsae.protocol.config import ProtocolConfig
    from jsae.training import JointSAETrainer

    calls: list[int] = []
    resample = JointSAETrainer._resample_dead
    monkeypatch.setattr(JointSAETrainer, "_resample_dead",
                        lambda self, v, t: (calls.append(self.step + 1), resample(self, v, t))[1])
    v, t = _pairs(256, d=8)
    assert revival_schedule(32) == (2, 4)
    for revival in (True, False):
        calls.clear()
        methods = train_methods(v, t, layer=0, d_sae=None, expansion_factor=4, steps=32, batch_size=64, lr=3e-3, seed=0,
                                methods=("jsae", "saelens-topk"), metadata={}, k=4, revival=revival)
        assert {m.sae.cfg.d_sae for m in methods.values()} == {32}
        topk = methods["saelens-topk"].sae
        assert calls == ([4, 8, 12, 16, 20, 24, 28] if revival else [])
        assert topk.cfg.aux_loss_coefficient == (1.0 if revival else 0.0)
        # SAELens's trainer now leaves a loss history for the converged check (every step at 32 steps)
        assert [h["details/n_training_steps"] for h in topk.training_history] == list(range(1, 33))
        assert all(h["losses/overall_loss"] > 0 for h in topk.training_history)
    with pytest.raises(ValueError, match=r"give d_sae \(24\) or expansion_factor \(4\), not both"):
        resolve_d_sae(8, 24, 4)
    with pytest.raises(ValueError, match="expansion_factor must be a whole number >= 1"):
        ProtocolConfig(expansion_factor=0)
    with pytest.raises(ValueError, match="not both"):
        ProtocolConfig(expansion_factor=4, d_sae=64)
    cfg = ProtocolConfig(expansion_factor=4)
    assert cfg.d_sae is None and cfg.expansion_factor == 4 and cfg.revival  # the preset's 128 is not filled in
    assert ProtocolConfig().d_sae == 128


def test_sae_metrics_dead_latents_and_fvu_per_branch_pooled_and_per_token():
    """A JSAE whose codes are 0 except vision latent 0 (always 1) with zero decoder rows reconstructs every
    input as its branch's b_dec: FVU = Σ|x - b_dec|² / Σ|x - mean|², by hand."""
    from jsae import JointSAE, JointSAEConfig
    from jsae.protocol.methods import Method
    from jsae.protocol.stages import sae_metrics
    from jsae.report.markdown import sae_convergence_table

    sae = JointSAE(JointSAEConfig(d_in=4, d_sae=6))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.vision.b_enc[0] = 1.0
        sae.text.b_dec.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    v, t, tok_v, tok_t = (torch.randn(n, 4, generator=g) for n in (20, 20, 50, 70))
    out = sae_metrics(Method("jsae", sae, True), v, t, tok_v, tok_t)

    def fvu(x, b_dec):
        return float((x - b_dec).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    b_t = sae.text.b_dec.detach()
    assert out["fvu_vision"] == pytest.approx(fvu(v, 0.0)) and out["fvu_text"] == pytest.approx(fvu(t, b_t))
    assert out["fvu_vision_tokens"] == pytest.approx(fvu(tok_v, 0.0))
    assert out["fvu_text_tokens"] == pytest.approx(fvu(tok_t, b_t))
    assert (out["d_sae"], out["dead_vision"], out["dead_text"], out["converged"]) == (6, 5, 6, False)
    table = "\n".join(sae_convergence_table({"llava": {"saes": [{"layer": 2, "method": "jsae", **out}]}}))
    assert f"| llava | 2 | jsae | 5 / 6 of 6 | {out['fvu_vision']:.2f} / {out['fvu_text']:.2f} |" in table


def test_permute_text_branch_is_a_relabelling():
    from jsae import TrainingJointSAE, TrainingJointSAEConfig

    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=8, d_sae=10))
    order = torch.randperm(10)
    p = permute_text_branch(sae, order)
    x = torch.randn(5, 8)
    torch.testing.assert_close(p.encode(x, "text"), sae.encode(x, "text")[:, order])
    torch.testing.assert_close(p(x, "text"), sae(x, "text"))


def test_world_judges():
    assert mentions("a small red cat at the top left", "cat")
    assert mentions("a small red cat at the top left", "animal")  # category through the type
    assert mentions("a small red cat at the top left", "red")
    assert not mentions("a small red cat at the top left", "apple")
    assert fluent("a small red cat at the top left")
    assert not fluent("red red zebra")
    assert not fluent("")


def _curve(key, layer, concept, r0, images, grid=(0.25, 0.5, 1.0, 2.0, 4.0), measure="steering", seed=0):
    """A synthetic threshold response: image i mentions the concept from strength r0 · u_i on (u_i ~ U(0.5, 2))."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.5, 2.0, len(images))
    eff = np.array([[float(g >= r0 * x) for x in u] for g in grid])
    pres = np.clip(1 - 0.2 * np.array(grid)[:, None] + 0 * eff, 0, 1)
    method, _, decoder = key.partition(":")
    return Curve(measure, method, decoder or "oracle", "image", layer, concept, list(grid), list(grid), list(images), eff,
                 pres, np.ones_like(eff, bool), np.zeros_like(eff, bool), [1, 2, 3], [0.6, 0.5, 0.4],
                 None if key == "oracle" else 0.5)


def test_curve_summaries_and_report_files(tmp_path):
    imgs = list(range(40))
    curves = [_curve(k, L, c, r0 * (2 if L == 5 else 1), imgs, seed=i)
              for i, (k, r0) in enumerate((("oracle", 0.5), ("jsae:text", 1.0), ("jsae-none:text", 1.0)))
              for L in (0, 5) for c in ("cat", "apple")]
    curves.append(_curve("jsae:vision", 0, "cat", 100.0, imgs))  # never reaches +0.5: r50 = inf, kept as a value
    s = summarise_curves(curves, n_boot=200)
    by = {(r["key"], r["layer"], r["concept"]): r for r in s["curves"]}
    assert by[("jsae:vision", 0, "cat")]["r50"] is None or by[("jsae:vision", 0, "cat")]["r50"] == float("inf")
    assert by[("jsae:vision", 0, "cat")]["p_not_reached"] == 1.0
    o, j = by[("oracle", 0, "cat")], by[("jsae:text", 0, "cat")]
    assert o["r50_low"] <= o["r50"] <= o["r50_high"] and o["r50"] < j["r50"]  # the oracle needs half the strength
    rows = {(r["key"], r["layer"]): r for r in s["rows"] if r["measure"] == "steering"}
    # jsae:text needs about twice the oracle's strength: log2 ratio ~ +1 with an interval around it
    assert 0.4 < rows[("jsae:text", 0)]["log2_vs_oracle"] < 1.6
    assert rows[("jsae:text", 0)]["log2_vs_oracle_low"] <= rows[("jsae:text", 0)]["log2_vs_oracle"]
    assert rows[("jsae:text", 0)]["reached"] == "2/2"
    assert all(v["p_holm"] is None or v["p_holm"] >= v["p_value"] for v in s["tests"].values())
    png = plot_dose_response(s["bands"]["steering"]["image"], 8, tmp_path / "dose.png", title="t",
                             suppression=s["bands"]["steering"]["image"])
    with Image.open(png) as im:  # a screen-sized figure: a row per measure (steering, preservation, suppression)
        assert 700 < im.size[0] < 2000 and 600 < im.size[1] < 1200 and im.format == "PNG"
    from jsae.report.plots import direction_style

    text, vision, none = direction_style("jsae:text"), direction_style("jsae:vision"), direction_style("jsae-none:text")
    assert text["color"] == vision["color"] and text["ls"] != vision["ls"]  # one colour per method, dashes for text
    assert text["color"] != none["color"] and text["ls"] == none["ls"]
    # the model x layer interaction across two runs of the same design
    def run(shift):
        cs = [_curve(k, L, c, r0 * (shift if L == 5 else 1), imgs, seed=i)
              for i, (k, r0) in enumerate((("oracle", 0.5), ("jsae:text", 1.0)))
              for L in (0, 5) for c in ("cat", "apple", "cake", "fish", "bird", "banana")]
        return {"layers": [0, 5], "config": {"positions": ["image"], "ratios": [0.25, 0.5, 1.0, 2.0, 4.0]},
                "summary": summarise_curves(cs, n_boot=50), "saes": []}
    runs = {"a": run(1.0), "b": run(4.0)}
    res = model_layer_interaction(runs)
    from jsae.report.markdown import sweep_report

    text = sweep_report(list(runs), res, runs)
    assert "| oracle | " in text and "**b** — steering at `image`" in text and "Holm p" in text
    assert set(res) == {"oracle", "jsae:text"} and all(0 < v["p_value"] <= 1 and v["p_holm"] >= v["p_value"] for v in res.values())
    assert res["oracle"]["mean_contrast"][0][1] != 0  # model b needs 4x more at layer 5: an interaction
    img = Image.new("RGB", (48, 48), (200, 30, 30))
    page = feature_browser([{"feature": 7, "label": "cat", "kind": "shared", "purity": 0.8, "layer": 2,
                             "top_images": [(img, np.eye(6))], "top_captions": ["a red cat"], "steering": "+0.4"}],
                           tmp_path / "features.html")
    html = page.read_text()
    assert "data:image/png;base64," in html and "a red cat" in html and "id='q'" in html
    assert "http://" not in html and "https://" not in html  # self-contained


def test_caption_judge_on_the_toy_model():
    """Caption words as concepts, plural-tolerant mentions, and the no-image perplexity fluency guard
    on the shipped toy LLaVA: grammatical captions pass, word salad and repetition loops do not."""
    import numpy as np

    from jsae.data.judges import CaptionJudge, caption_words, distinct_2, text_perplexity
    from jsae import load_vlm

    model, processor, _ = load_vlm("llava")
    good = ["a small red cat at the top left", "a large blue apple at the bottom right and a small green dog at the top left"]
    salad = ["left the apple top small at red a", "dog dog dog dog dog dog dog dog"]
    ppl = text_perplexity(model, processor, good + salad)
    assert ppl.shape == (4,) and np.isfinite(ppl).all() and max(ppl[:2]) < min(ppl[2:])
    assert caption_words("Two cats and a dog.") >= {"two", "cats", "cat", "dog"}
    assert distinct_2("dog dog dog dog dog") < 0.5 <= distinct_2(good[1])
    judge = CaptionJudge(["cat", "dog", "apple"], lambda t: text_perplexity(model, processor, t))
    y = judge.presence([{"caption": "two cats on a mat"}, {"caption": "an apple"}])
    assert y.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert judge.mentions("some dogs", "dog") and not judge.mentions("a hotdog", "dog")
    assert judge.others({"caption": "a cat and an apple"}, "cat") == ["apple"]
    with pytest.raises(RuntimeError, match="calibrate"):
        judge.fluency(good)
    judge.calibrate(good)
    assert judge.fluency(good) == 1.0 and judge.fluency(salad) == 0.0 and judge.fluency(["", good[0]]) == 0.5
    with pytest.raises(ValueError, match="max_perplexity must be a finite number"):
        CaptionJudge(["cat"], lambda t: t, max_perplexity=float("nan"))


def test_strict_fluency_and_hallucination():
    """The strict check accepts every template of every scene and rejects the degenerate outputs the old
    guard let through; a named object that is neither in the image nor the concept is a hallucination."""
    from jsae.data.judges import WorldJudge
    from jsae.world.grammar import N_TEMPLATES, caption, parses
    from jsae.world.scenes import generate_scene

    for i in range(200):
        objs = generate_scene(i).objects
        assert all(parses(caption(objs, t)) for t in range(N_TEMPLATES))
    for bad in ("a cake at the cake , a cake red cake red cake", "cat", "right at the bottom left and a large purple cat",
                "a large red cake at the top left and a small blue", "the animal at the top left is a large red cake",
                "a large red cake at the top left , a small blue cat at the top left", ""):
        assert not parses(bad), bad
        assert not WorldJudge().fluent_each([bad])[0]
    item = {"objects": [{"name": "cat", "color": "red", "size": "small", "position": "top left"}]}
    j = WorldJudge()
    assert not j.hallucinated("a small red cat at the top left", item, "cake")
    assert not j.hallucinated("a small red cat at the top left and a large blue cake at the top right", item, "cake")
    assert not j.hallucinated("a small red cat at the top left and a large blue apple at the top right", item, "food")
    assert j.hallucinated("a small red cat at the top left and a large blue bird at the top right", item, "cake")


def test_default_layers_stop_below_the_last_for_prefill_edits():
    from jsae.protocol.config import default_layers

    assert default_layers(8, 4) == [0, 2, 4, 6]  # image-token edits at prefill are null at the last layer
    assert default_layers(8, 4, last=True) == [0, 2, 5, 7]  # every-step edits reach it
    assert default_layers(1, 4) == [0]


def test_comparisons_skip_concepts_no_direction_moves():
    """A layer where neither direction reaches +0.5 is reported as not compared (no p-value), not as 'equal'."""
    imgs = list(range(20))
    curves = [_curve(k, 0, c, r0, imgs, seed=i) for i, (k, r0) in enumerate((("oracle", 100.0), ("jsae:text", 100.0),
                                                                             ("jsae-none:text", 100.0)))
              for c in ("cat", "apple")]
    s = summarise_curves(curves, n_boot=50)
    t = s["tests"]["steering@image L0: log2 r50 jsae:text − jsae-none:text"]
    assert t["p_value"] is None and t["n"] == 0 and "not compared" in t["note"]
    row = next(r for r in s["rows"] if r["key"] == "jsae:text" and r["measure"] == "steering")
    assert row["oracle_reached"] == 0 and row.get("log2_vs_oracle") is None and row["reached"] == "0/2"


def test_report_says_when_its_saes_are_not_converged():
    from jsae.report.markdown import convergence_note

    saes = [{"method": "jsae", "converged": False, "dead_vision": 300, "d_sae": 512},
            {"method": "saelens-topk", "converged": False, "dead_vision": 250, "d_sae": 512},
            {"method": "jsae-none", "converged": True, "dead_vision": 20, "d_sae": 512}]
    (line,) = convergence_note(saes)
    assert "2 of 3 are not converged" in line and "250–300 of 512 vision latents" in line
    assert convergence_note(saes[2:]) == [] and convergence_note([]) == []
