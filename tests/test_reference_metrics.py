"""The reference's caption metrics (:mod:`jsae.protocol.reference_metrics`) on real tiny local models:
a random BERT wrapped as a sentence-transformers model, a random GPT-2; nothing mocked."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jsae.protocol.reference_metrics import (
    Experiment,
    LMPerplexity,
    SentenceSimilarity,
    caption_metrics,
    keyword_hit,
    keyword_hit_rate,
    read_experiment_table,
    write_experiment_table,
)

torch.set_num_threads(1)

WORDS = ["a", "the", "red", "blue", "cat", "dog", "on", "mat", "sky", "sea", "ship", "big", "small", "of", "and"]


def _word_tokenizer(pad: bool, bos_eos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = dict(unk_token="[UNK]", model_max_length=64)
    if pad:
        kw["pad_token"] = "[PAD]"
    if bos_eos:
        kw.update(bos_token="[CLS]", eos_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw), vocab


# ----------------------------------------------------------------------------------------------------------------
# experiment table
# ----------------------------------------------------------------------------------------------------------------


def test_experiment_table_round_trip(tmp_path: Path) -> None:
    exps = [
        Experiment("dogs", 12, [5, 17], ["dog", "puppy"], "A dog runs on the grass.", ["img1", "img2"]),
        Experiment("hot", 3, [0], ["hot dog, sausage", "bun;roll"], "", []),
        Experiment("one", -1, [7], ["x"], "t, with comma", ["000123"]),
    ]
    path = write_experiment_table(exps, tmp_path / "sub" / "exps.csv")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    assert read_experiment_table(path) == exps


def test_experiment_table_accepts_separators_and_json(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("\ufeffname,layer,latents,keywords,target,image_ids,extra\n"
                 'a,4,"1, 2",cat;kitten,A cat.,"i1,i2",zzz\n'
                 'b,5.0,"[3, 4]","[""red"", ""blue""]",Colours.,[],\n'
                 "\n"
                 "c, 6 ,8;9;,dog,,,\n")
    got = read_experiment_table(p)
    assert [e.name for e in got] == ["a", "b", "c"]
    assert got[0] == Experiment("a", 4, [1, 2], ["cat", "kitten"], "A cat.", ["i1", "i2"])
    assert got[1].layer == 5 and got[1].latents == [3, 4] and got[1].keywords == ["red", "blue"] and got[1].image_ids == []
    assert got[2].layer == 6 and got[2].latents == [8, 9] and got[2].target == "" and got[2].image_ids == []


HEADER = "name,layer,latents,keywords,target,image_ids\n"


@pytest.mark.parametrize("body, match", [
    (None, r"not found; pass the path of a CSV with columns name,layer,latents,keywords,target,image_ids"),
    ("name,layer,keywords,target\nx,1,a,t\n", r"lacks column\(s\) latents,image_ids; the header must name name,layer"),
    (HEADER + "x,twelve,1,dog,t,\n", r"row 1 \(line 2\), experiment 'x': layer 'twelve' is not an integer"),
    (HEADER + "x,1,1,dog,t,\ny,2.5,1,dog,t,\n", r"row 2 \(line 3\), experiment 'y': layer '2.5' is not an integer"),
    (HEADER + "x,1,1;b7,dog,t,\n", r"row 1 \(line 2\), experiment 'x': latent id 'b7' is not an integer"),
    (HEADER + "x,1,,dog,t,\n", r"row 1 \(line 2\), experiment 'x': no latent ids"),
    (HEADER + "x,1,3,,t,\n", r"row 1 \(line 2\), experiment 'x': keywords is empty"),
    (HEADER + "x,1,3, ; ,t,\n", r"row 1 \(line 2\), experiment 'x': keywords is empty"),
    (HEADER + "x,1,[3,dog,t,\n", r"row 1 \(line 2\), experiment 'x': latents .* not a valid JSON list"),
])
def test_experiment_table_errors(tmp_path: Path, body: str | None, match: str) -> None:
    p = tmp_path / "t.csv"
    if body is not None:
        p.write_text(body)
    with pytest.raises(ValueError, match=match) as info:
        read_experiment_table(p)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# keyword hits
# ----------------------------------------------------------------------------------------------------------------


def test_keyword_hits() -> None:
    assert keyword_hit("A big DOG on a mat", ["dog"])
    assert keyword_hit("hotdogs", ["Dog"])  # a substring, as the reference
    assert not keyword_hit("a cat", ["dog", "puppy"])
    assert not keyword_hit("a cat", [])
    assert keyword_hit_rate(["a dog", "a cat", "PUPPY!", ""], ["dog", "puppy"]) == 0.5
    assert math.isnan(keyword_hit_rate([], ["dog"]))


# ----------------------------------------------------------------------------------------------------------------
# sentence similarity on a tiny local sentence-transformers model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sentence_transformers")
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("st")
    tok, vocab = _word_tokenizer(pad=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).eval().save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    transformer = Transformer(str(root / "bert"))
    # the BERT's width, given (sentence-transformers 5 and 6 name the Transformer's getter differently)
    model = SentenceTransformer(modules=[transformer, Pooling(cfg.hidden_size, "mean")],
                                device="cpu")
    model.save(str(root / "st"))
    return root / "st"


def test_sentence_similarity_local(st_path: Path) -> None:
    sim = SentenceSimilarity(st_path)
    s = sim.similarity(["a red cat", "the blue sea", "a red cat on the mat"], "a red cat")
    assert s.shape == (3,) and np.all(np.isfinite(s)) and np.all(np.abs(s) <= 1 + 1e-5)
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert s[1] < 1 - 1e-4
    g = sim.gain(["a dog", "the sky"], ["a dog", "the ship"], "a big dog")
    assert g.shape == (2,) and g[0] == pytest.approx(0.0, abs=1e-6)
    assert g[1] == pytest.approx(sim.similarity(["the sky"], "a big dog")[0] - sim.similarity(["the ship"], "a big dog")[0],
                                 abs=1e-5)
    assert sim.similarity([], "x").shape == (0,) and sim.gain([], [], "x").shape == (0,)
    with pytest.raises(ValueError, match="paired"):
        sim.gain(["a"], [], "x")

    m = caption_metrics(["a red cat", "a dog"], ["the sea", "a dog"], ["cat"], target="a red cat", similarity=sim)
    assert m["n"] == 2 and m["keyword_hit_rate_steered"] == 0.5 and m["keyword_hit_rate_unsteered"] == 0.0
    assert m["similarity_steered"] > m["similarity_unsteered"] and m["similarity_gain"] > 0
    with pytest.raises(ValueError, match="target sentence"):
        caption_metrics(["a"], ["b"], ["a"], similarity=sim)


def test_sentence_similarity_offline_hub_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not load sentence-embedding model 'nobody-jsae/no-such-model' "
                                      r"\(offline.*\); pass a local path with --similarity-model") as info:
        SentenceSimilarity("nobody-jsae/no-such-model")
    assert "\n" not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(OSError, match="no such folder") as info:
        SentenceSimilarity(str(tmp_path / "missing"))
    assert "\n" not in str(info.value)


def test_sentence_similarity_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # `import sentence_transformers` fails
    with pytest.raises(ImportError, match=r"pip install 'jsae\[similarity\]'") as info:
        SentenceSimilarity("anything")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# perplexity on a tiny local GPT-2
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    """A random GPT-2 and the same model with an lm_head that strongly prefers 'cat' (a tokenizer without a
    pad token, as GPT-2's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    tok, vocab = _word_tokenizer(pad=False)
    assert tok.pad_token is None
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)
        model.transformer.ln_f.weight.fill_(0.0)
        model.transformer.ln_f.bias.fill_(1.0)  # the final hidden state is constant: logits = lm_head row sums
        model.lm_head.weight[vocab["cat"]] = 0.3
    model.save_pretrained(root / "cat")
    tok.save_pretrained(root / "cat")
    return root / "plain", root / "cat", vocab


def test_perplexity(gpt2_paths: tuple[Path, Path, dict[str, int]]) -> None:
    plain, cat, _ = gpt2_paths
    lm = LMPerplexity(plain, batch_size=2)
    texts = ["a red cat on the mat", "the sea", "", "dog", "the big blue ship of the sky and the sea", "a red cat on the mat"]
    ppl = lm(texts)
    assert ppl.shape == (6,)
    assert np.isnan(ppl[2]) and np.isnan(ppl[3])  # 0 and 1 token: no next-token loss
    ok = ppl[[0, 1, 4, 5]]
    assert np.all(np.isfinite(ok)) and np.all(ok >= 1.0)
    # padding does not change a text's perplexity: batched (padded next to longer texts) = alone
    assert ppl[0] == pytest.approx(ppl[5], rel=1e-5)
    assert ppl[1] == pytest.approx(lm(["the sea"])[0], rel=1e-5)
    assert ppl[0] == pytest.approx(lm(["a red cat on the mat"])[0], rel=1e-5)
    assert lm([]).shape == (0,)
    # a text longer than the context (16 positions) is cut, not an error
    assert np.isfinite(lm([" ".join(["cat"] * 40)])[0])

    biased = LMPerplexity(cat)
    p_cat, p_other = biased(["cat cat cat cat cat", "the red sea of ships"])
    assert p_cat < 1.01 and p_other > 100 * p_cat

    m = caption_metrics(["cat cat cat cat cat", "a cat"], ["the red sea of ships", "the dog"], ["cat"], perplexity=biased)
    assert m["perplexity_steered"] < m["perplexity_unsteered"]
    assert m["keyword_hit_rate_steered"] == 1.0 and m["keyword_hit_gain"] == 1.0
    assert m["distinct_3_steered"] == pytest.approx(1 / 3) and m["distinct_3_unsteered"] == 1.0
    assert m["zlib_ratio_steered"] is not None and "similarity_gain" not in m


def test_perplexity_offline_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not load language model 'nobody-jsae/no-such-lm' \(offline.*\); "
                                      r"pass a local path with --perplexity-model") as info:
        LMPerplexity("nobody-jsae/no-such-lm")
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=r"could not load language model from the folder") as info:
        LMPerplexity(tmp_path / "empty")
    assert "\n" not in str(info.value)


def test_caption_metrics_plain() -> None:
    m = caption_metrics(["a dog a dog a dog", "x"], ["a cat", "y"], ["dog"])
    assert m["n"] == 2 and m["keyword_hit_rate_steered"] == 0.5 and m["keyword_hit_rate_unsteered"] == 0.0
    assert "perplexity_steered" not in m and "similarity_gain" not in m
    assert m["distinct_3_steered"] == pytest.approx(0.5) and m["distinct_3_unsteered"] is None
    with pytest.raises(ValueError, match="paired"):
        caption_metrics(["a"], [], ["a"])
    with pytest.raises(ValueError, match="keyword"):
        caption_metrics(["a"], ["b"], [])
