"""The reference's steering experiments (:mod:`jsae.protocol.experiments`) on real tiny objects: a tiny random
LLaVA (:mod:`jsae.testing`), a random JSAE of its width saved in a run directory, a tiny local GPT-2 for the
perplexity rule; nothing mocked.  The sound grid, steering reaching the model, the world's image index, the
reference's walk and its faults, the one-line errors and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
import zlib

import pytest
import torch
from typer.testing import CliRunner

from jsae.data.judges import compression_ratio
from jsae.protocol.experiments import (
    FAULTS,
    reference_repetition,
    reference_walk,
    run_experiments,
    steering_direction,
    write_experiments_report,
)
from jsae.protocol.reference_metrics import (
    Experiment,
    LMPerplexity,
    write_experiment_table,
)

torch.set_num_threads(1)

LAYER = 1
D_SAE = 64


@pytest.fixture(scope="module")
def tiny() -> object:
    """A tiny random LLaVA wrapped as ``jsae.load_vlm`` returns it."""
    from jsae.testing import build_hf, build_processor
    from jsae.vlm import as_vlm

    return as_vlm(build_hf("llava", layers=3, hidden=32, seed=0), build_processor("llava"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a random JSAE of the tiny model's width at layer 1."""
    from jsae.saes.joint_sae import JointSAE, JointSAEConfig

    root = tmp_path_factory.mktemp("exp") / "run"
    torch.manual_seed(0)
    JointSAE(JointSAEConfig(d_in=32, d_sae=D_SAE)).save_model(root / "saes" / "jsae" / f"layer_{LAYER}")
    return root


@pytest.fixture(scope="module")
def images() -> list:
    from jsae.testing import make_image

    return [make_image(24, 24, seed=i) for i in range(3)]


def _table(path: Path, *experiments: Experiment) -> Path:
    return write_experiment_table(experiments, path)


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------------------------------------------
# the sound grid
# ----------------------------------------------------------------------------------------------------------------


def test_grid_every_alpha_on_every_image(tiny, run_dir: Path, images: list, tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv", Experiment("cats", LAYER, [3, 7], ["cat", "dog"], "a red cat", ["0", "1", "2"]))
    alphas = (0.0, 0.5, 1e3)
    res = run_experiments(table, run_dir, vlm=tiny, images=images, alphas=alphas, max_new_tokens=6, progress=False)
    json.dumps(res, allow_nan=False)  # JSON-able, no NaN
    assert "faults" not in res and res["config"]["alpha_choice"].startswith("none")
    (e,) = res["experiments"]
    assert e["name"] == "cats" and e["layer"] == LAYER and e["latents"] == [3, 7] and e["n_images"] == 3
    assert "reference_walk" not in e
    assert [g["alpha"] for g in e["grid"]] == list(alphas)
    for g in e["grid"]:
        assert g["n"] == 3 and len(g["captions"]) == 3
        for key in ("keyword_hit_rate_steered", "keyword_hit_rate_unsteered"):
            assert math.isfinite(g[key]) and 0.0 <= g[key] <= 1.0
        assert g["keyword_hit_gain"] == pytest.approx(g["keyword_hit_rate_steered"] - g["keyword_hit_rate_unsteered"])
        assert "similarity_gain" not in g and "perplexity_steered" not in g and "distinct_3_steered" in g
    # rows are (α, image) in order: α = 0 adds nothing, so its captions are the unsteered ones, image by image
    assert e["grid"][0]["captions"] == e["unsteered"]
    # a huge α reaches the model: the captions change
    assert e["grid"][-1]["captions"] != e["unsteered"]
    json_path, md_path = write_experiments_report(res, tmp_path / "out")
    assert json.loads(json_path.read_text()) == res
    md = md_path.read_text()
    assert "## cats" in md and md.count("\n| 1000 |") == 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_direction_is_the_sum_of_unit_text_rows(run_dir: Path) -> None:
    from jsae.saes.joint_sae import JointSAE

    sae = JointSAE.load_from_disk(run_dir / "saes" / "jsae" / f"layer_{LAYER}")
    W = sae.W_dec_of("text").detach()
    want = W[3] / W[3].norm() + W[7] / W[7].norm()
    assert torch.allclose(steering_direction(sae, [3, 7]), want, atol=1e-5)
    assert not torch.allclose(steering_direction(sae, [3, 7]), (sae.W_dec_of("vision")[[3, 7]].detach()
                                                               / sae.W_dec_of("vision")[[3, 7]].detach().norm(dim=-1, keepdim=True)).sum(0))


def test_world_image_ids_are_indices_into_the_split(tiny, run_dir: Path, tmp_path: Path) -> None:
    from jsae.world.data import world_dataset

    table = _table(tmp_path / "t.csv", Experiment("w", LAYER, [5], ["circle"], "", ["0", "2"]))
    res = run_experiments(table, run_dir, vlm=tiny, alphas=(0.0,), max_new_tokens=4, progress=False)
    (e,) = res["experiments"]
    assert e["n_images"] == 2 and res["config"]["images"] == "world" and res["config"]["data_split"] == "test"
    # the same captions as captioning world_dataset("test") rows 0 and 2 directly, given as images
    ds = world_dataset("test", 3, seed=0)
    assert ds[0]["image"].size == (48, 48)
    direct = run_experiments(table, run_dir, vlm=tiny, images=[ds[0]["image"], None, ds[2]["image"]], alphas=(0.0,),
                             max_new_tokens=4, progress=False)
    assert direct["experiments"][0]["unsteered"] == e["unsteered"]


def test_dataset_image_ids(tiny, run_dir: Path, images: list, tmp_path: Path) -> None:
    """``data``: a saved caption dataset, matched by its image_id column, else by row index."""
    import datasets as hf

    feats = {"image": hf.Image(), "caption": hf.Value("string")}
    rows = [{"image": im, "caption": "a cat"} for im in images]
    hf.Dataset.from_list([{**r, "image_id": f"img{10 + i}"} for i, r in enumerate(rows)],
                         features=hf.Features({**feats, "image_id": hf.Value("string")})).save_to_disk(tmp_path / "ids")
    hf.Dataset.from_list(rows, features=hf.Features(feats)).save_to_disk(tmp_path / "rows")
    kw = {"vlm": tiny, "alphas": (0.0,), "max_new_tokens": 3, "progress": False, "data_split": "train"}
    want = run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["2", "0"])], run_dir, images=images,
                           prompt="describe the image", **kw)["experiments"][0]["unsteered"]
    got = run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["img12", "img10"])], run_dir,
                          data=str(tmp_path / "ids"), prompt="describe the image", **kw)
    assert got["experiments"][0]["unsteered"] == want and got["config"]["prompt"] == "describe the image"
    got = run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["2", "0"])], run_dir, data=str(tmp_path / "rows"),
                          prompt="describe the image", **kw)
    assert got["experiments"][0]["unsteered"] == want
    with pytest.raises(ValueError) as info:
        run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["img3"])], run_dir, data=str(tmp_path / "ids"), **kw)
    assert "unknown image id 'img3'" in _one_line(info.value) and "image_id column" in str(info.value)
    with pytest.raises(ValueError) as info:
        run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["3"])], run_dir, data=str(tmp_path / "rows"), **kw)
    assert "unknown image id '3'" in _one_line(info.value) and "rows 0..2" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# the reference's walk and its faults
# ----------------------------------------------------------------------------------------------------------------


def _s(caption: str = "a b c d e", hit: bool = False, sim: float | None = None, ppl: float | None = None,
       d3: float = 1.0, cr: float = 1.0) -> dict:
    return {"caption": caption, "keyword_hit": hit, "similarity_gain": sim, "perplexity": ppl, "distinct_3": d3,
            "compression_ratio": cr}


def test_walk_rules_in_the_reference_order() -> None:
    A = [0.2, 0.4, 0.6, 0.8]
    # (a): the similarity gain decreased while > 0.1 -> stop; the previous α is reported
    w = reference_walk(A, [_s(sim=0.3), _s(sim=0.5), _s(sim=0.4), _s(sim=0.9)], use_similarity=True, use_perplexity=False)
    assert (w["alpha"], w["stopped_at"], w["rule"]) == (0.4, 0.6, "a") and w["similarity_gain"] == 0.5
    # ... but a decrease at <= 0.1 goes on, and the last α is reported though an earlier one was better
    w = reference_walk(A, [_s(sim=0.05), _s(sim=0.5), _s(sim=0.02), _s(sim=0.01)], use_similarity=True, use_perplexity=False)
    assert w["alpha"] == 0.8 and w["rule"] is None and w["last_not_best"] and w["best_alpha"] == 0.4
    # (b) sign-reversed: a perplexity rise of 30 goes on, a drop of 11 stops
    w = reference_walk(A, [_s(ppl=5.0), _s(ppl=35.0), _s(ppl=24.0), _s(ppl=24.0)], use_similarity=False, use_perplexity=True)
    assert (w["alpha"], w["stopped_at"], w["rule"]) == (0.4, 0.6, "b_drop")
    assert w["perplexity_rose_gt_10_not_stopped"] == [0.4]
    # (b) ppl > 40 never stops the first α (no prev_ppl yet)
    w = reference_walk(A, [_s(ppl=90.0), _s(ppl=95.0), _s(ppl=5.0), _s(ppl=5.0)], use_similarity=False, use_perplexity=True)
    assert (w["alpha"], w["stopped_at"], w["rule"]) == (0.2, 0.4, "b_over_40")
    # (d): < -0.2 twice in a row; (c): repetitive; an empty caption skips its α
    w = reference_walk(A, [_s(sim=-0.3), _s(sim=-0.25), _s(), _s()], use_similarity=True, use_perplexity=False)
    assert (w["alpha"], w["rule"]) == (0.2, "d")
    w = reference_walk(A, [_s(), _s(caption=""), _s(d3=0.2, cr=0.25), _s()], use_similarity=False, use_perplexity=False)
    assert (w["alpha"], w["stopped_at"], w["rule"], w["skipped_empty"]) == (0.2, 0.6, "c", [0.4])
    assert w["reference_reported_repetition"]["alpha"] == 0.6  # the reference prints the stop α's repetition
    # rules needing a model are skipped without it
    w = reference_walk(A, [_s(sim=0.3, ppl=1.0), _s(sim=0.5, ppl=99.0), _s(sim=0.4, ppl=1.0), _s(sim=0.4, ppl=1.0)],
                       use_similarity=False, use_perplexity=False)
    assert w["rule"] is None and w["alpha"] == 0.8
    # stopped before recording anything
    w = reference_walk(A, [_s(d3=0.1, cr=0.1)] * 4, use_similarity=False, use_perplexity=False)
    assert w["alpha"] is None and w["stopped_at"] == 0.2 and "note" in w


def test_reference_repetition() -> None:
    assert reference_repetition("") == (0.0, 0.0) and reference_repetition("a b c") == (1.0, 1.0)
    text = " ".join(["the cat"] * 30)
    d3, cr = reference_repetition(text)
    assert d3 == 2 / 58  # 58 trigrams, two distinct: (the, cat, the) and (cat, the, cat)
    assert cr == len(zlib.compress(text.encode())) / len(text.encode()) and cr < 0.3  # compressed / raw
    assert reference_repetition("a red cake next to a blue car") == (1.0, compression_ratio("a red cake next to a blue car"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> LMPerplexity:
    """A random GPT-2 over the tiny VLM's words: near-uniform over ~90 tokens, so perplexity ≈ 90 > 40."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from jsae.testing import WORDS

    vocab = {t: i for i, t in enumerate(["[UNK]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", model_max_length=64)
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=4)).eval().save_pretrained(root)
    tok.save_pretrained(root)
    return LMPerplexity(root)


def test_reference_faults_walk_stops_on_perplexity(tiny, run_dir: Path, images: list, gpt2: LMPerplexity,
                                                    tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv", Experiment("cats", LAYER, [3], ["cat"], "a red cat", ["0", "1"]))
    alphas = (0.005, 0.01, 0.02)  # small: the tiny model's states have norms ~0.1, larger α gives one-word captions
    res = run_experiments(table, run_dir, vlm=tiny, images=images, alphas=alphas, max_new_tokens=6, perplexity=gpt2,
                          reference_faults=True, progress=False)
    json.dumps(res, allow_nan=False)
    (e,) = res["experiments"]
    assert [g["alpha"] for g in e["grid"]] == list(alphas)  # the sound grid is still complete
    assert all(g["perplexity_steered"] > 40 for g in e["grid"])
    walks = e["reference_walk"]
    assert [w["image_id"] for w in walks] == ["0", "1"]
    for w in walks:  # ppl > 40 fires at the second α (the first has no prev_ppl): stopped early
        assert (w["alpha"], w["stopped_at"], w["rule"]) == (0.005, 0.01, "b_over_40")
        assert w["perplexity"] > 40 and w["caption"] == e["grid"][0]["captions"][int(w["image_id"])]
    assert e["reference_walk_summary"]["stopped_by"]["b_over_40"] == 2
    assert e["reference_walk_summary"]["grid_at_fixed_alpha"]["alpha"] == 0.005
    faults = {f["name"]: f for f in res["faults"]}
    assert list(faults) == list(FAULTS)
    assert faults["perplexity_rule_sign_reversed"]["active"] and not faults["alpha_by_eval_metric"]["active"]
    assert faults["perplexity_rule_sign_reversed"]["by_experiment"]["cats"]["walk"]["stopped_by_over_40"] == 2
    rules = res["config"]["reference_rules"]
    assert rules["b"]["active"] and rules["c"]["active"] and not rules["a"]["active"] and not rules["d"]["active"]
    md = write_experiments_report(res, tmp_path / "o")[1].read_text()
    assert "perplexity_rule_sign_reversed" in md and "perplexity > 40" in md


@pytest.fixture(scope="module")
def sbert(tmp_path_factory: pytest.TempPathFactory):
    """A random BERT over the tiny VLM's words as a local sentence-transformers model."""
    pytest.importorskip("sentence_transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    from jsae.protocol.reference_metrics import SentenceSimilarity
    from jsae.testing import WORDS

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", model_max_length=64)
    root = tmp_path_factory.mktemp("st")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0)).eval().save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    transformer = Transformer(str(root / "bert"))
    # the BERT's width, given (sentence-transformers 5 and 6 name the Transformer's getter differently)
    SentenceTransformer(modules=[transformer, Pooling(32, "mean")],
                        device="cpu").save(str(root / "st"))
    return SentenceSimilarity(root / "st")


def test_similarity_gain_and_its_rules(tiny, run_dir: Path, images: list, sbert, tmp_path: Path) -> None:
    exp = Experiment("cats", LAYER, [3], ["cat"], "a red cat on the left", ["0", "1"])
    alphas = (0.005, 0.05)
    res = run_experiments([exp], run_dir, vlm=tiny, images=images, alphas=alphas, max_new_tokens=5, similarity=sbert,
                          reference_faults=True, progress=False)
    json.dumps(res, allow_nan=False)
    (e,) = res["experiments"]
    for g in e["grid"]:  # the mean over images of sim(steered, target) - sim(unsteered, target)
        want = sbert.gain(g["captions"], e["unsteered"], exp.target).mean()
        assert g["similarity_gain"] == pytest.approx(float(want), abs=1e-5)
    for i, w in enumerate(e["reference_walk"]):
        k = alphas.index(w["alpha"])
        assert w["similarity_gain"] == pytest.approx(float(sbert.gain([e["grid"][k]["captions"][i]], [e["unsteered"][i]],
                                                                      exp.target)[0]), abs=1e-5)
    rules = res["config"]["reference_rules"]
    assert rules["a"]["active"] and rules["d"]["active"] and not rules["b"]["active"]
    faults = {f["name"]: f for f in res["faults"]}
    assert faults["alpha_by_eval_metric"]["active"] and not faults["perplexity_rule_sign_reversed"]["active"]
    assert faults["last_not_best"]["by_experiment"]["cats"]["metric"] == "similarity_gain"
    with pytest.raises(ValueError) as info:  # the gain needs a target sentence
        run_experiments([Experiment("t", LAYER, [3], ["cat"], "", ["0"])], run_dir, vlm=tiny, images=images,
                        similarity=sbert, progress=False)
    assert "no target sentence" in _one_line(info.value)


# ----------------------------------------------------------------------------------------------------------------
# one-line errors
# ----------------------------------------------------------------------------------------------------------------


def test_errors(tiny, run_dir: Path, images: list, tmp_path: Path) -> None:
    kw = {"vlm": tiny, "images": images, "alphas": (1.0,), "max_new_tokens": 2, "progress": False}
    with pytest.raises(FileNotFoundError) as info:
        run_experiments([Experiment("x", 2, [1], ["cat"], "", ["0"])], run_dir, **kw)
    msg = _one_line(info.value)
    assert "no jsae SAE for layer 2" in msg and str(run_dir) in msg and "jsae demo --layers 2" in msg
    with pytest.raises(ValueError) as info:
        run_experiments([Experiment("x", LAYER, [1, D_SAE], ["cat"], "", ["0"])], run_dir, **kw)
    assert f"latent id {D_SAE} is out of range" in _one_line(info.value) and "'x'" in str(info.value)
    with pytest.raises(ValueError) as info:
        run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["0", "7"])], run_dir, **kw)
    assert "unknown image id '7'" in _one_line(info.value)
    with pytest.raises(ValueError) as info:
        run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["a"])], run_dir, **{**kw, "images": None})
    assert "unknown image id 'a'" in _one_line(info.value) and "integer" in str(info.value)
    with pytest.raises(ValueError) as info:
        run_experiments([Experiment("x", LAYER, [1], ["cat"], "", ["b"])], run_dir, **{**kw, "images": {"a": images[0]}})
    assert "unknown image id 'b'" in _one_line(info.value)


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------


def test_cli(run_dir: Path, tmp_path: Path) -> None:
    from jsae.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["run", "experiments", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0, r.output
    for opt in ("--table", "--run", "--out", "--model", "--data", "--method", "--alphas", "--similarity-model",
                "--perplexity-model", "--reference-faults", "--max-new-tokens", "--dtype", "--device"):
        assert opt in r.output, opt
    table = _table(tmp_path / "t.csv", Experiment("x", 5, [1], ["cat"], "", ["0"]))
    r = runner.invoke(app, ["run", "experiments", "--table", str(table), "--run", str(run_dir)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1
    assert "jsae demo --layers 5" in r.output
    r = runner.invoke(app, ["run", "experiments", "--table", str(tmp_path / "none.csv"), "--run", str(run_dir)])
    assert r.exit_code == 2 and "not found" in r.output
