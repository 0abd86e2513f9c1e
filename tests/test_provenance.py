"""Provenance: a checkpoint, an SAE, a labels file carry the model, layer, hook and data they were made for,
and using one in another context is refused with one line (unless explicitly allowed).  Also: a second
forward inside one ``intervene()`` is a forward over the prompt, not a decode step."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vlm

import jsae
from jsae import TrainingJointSAEConfig
from jsae.interventions import Clamp, Splice, Steer, intervene
from jsae.labels import FeatureLabels, label_features
from jsae.provenance import ProvenanceError, mismatches, same_model, sae_record
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from jsae.testing import pairs_with


pairs = pairs_with(n=64, d=16, rank=4)  # the shared synthetic pairs (jsae.testing)


def trainer(ckpt, layer=2, steps=10, seed=0, data_seed=0, every=0):
    cfg = TrainingJointSAEConfig(d_in=16, d_sae=32)
    cfg.metadata["model_name"], cfg.metadata["layer"] = "llava", layer
    cfg.metadata["hook_name"] = f"model.language_model.layers.{layer}"
    tcfg = JointTrainerConfig(total_steps=steps, lr=3e-3, progress=False, log_every=5, checkpoint_dir=str(ckpt), seed=seed,
                              checkpoint_every=every, keep_checkpoints=5)
    return JointSAETrainer.from_config(cfg, tcfg, PairedTensorData(*pairs(seed=data_seed), batch_size=8))


def test_a_checkpoint_of_another_layer_or_data_is_refused(tmp_path):
    done = trainer(tmp_path, layer=2).fit()
    state = json.loads((tmp_path / "step-0000010" / "trainer_state.json").read_text())
    assert state["provenance"]["sae"]["layer"] == 2 and len(state["provenance"]["data"]["sha"]) == 32
    with pytest.raises(ProvenanceError, match=r"layer 2 vs 5; hook_name .*; use a new checkpoint_dir, or pass "
                                              r"allow_provenance_mismatch=True"):
        trainer(tmp_path, layer=5).fit()
    with pytest.raises(ProvenanceError, match=r"training data \(sha differ\)"):
        trainer(tmp_path, layer=2, data_seed=1).fit()
    same = trainer(tmp_path, layer=2).fit()  # the same run: resumes (a finished run returns its weights)
    assert all(torch.equal(a, b) for a, b in zip(done.state_dict().values(), same.state_dict().values()))
    forced = trainer(tmp_path, layer=5).fit(allow_provenance_mismatch=True)
    assert torch.equal(forced.W_dec_of("text"), done.W_dec_of("text"))


def test_checkpoints_written_before_provenance_still_resume(tmp_path):
    import shutil

    trainer(tmp_path, every=5).fit()
    shutil.rmtree(tmp_path / "step-0000010")  # as if killed after step 5, by a jsae without provenance records
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-0000005", "step": 5}))
    path = tmp_path / "step-0000005" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["provenance"]
    path.write_text(json.dumps(state))
    tr = trainer(tmp_path, layer=5, every=5)
    tr.fit()
    assert tr.step == 10 and (tmp_path / "step-0000010").is_dir()


def test_model_names_and_records():
    assert same_model("llava", "/site-packages/jsae/world/models/llava") and same_model("org/llava", "llava")
    assert not same_model("qwen3-vl-moe", "llava") and same_model(None, "llava")
    assert mismatches({"layer": 4, "model": "llava"}, {"layer": "4", "model": "llava", "pooling": "mean"}) == []
    assert mismatches({"layer": 4}, {"layer": 2}) == [("layer", 4, 2)]


def _sae(v, **meta):
    torch.manual_seed(0)
    sae = jsae.JointSAE(jsae.JointSAEConfig(d_in=v.adapter.d_in, d_sae=64))
    for k, value in meta.items():
        sae.cfg.metadata[k] = value
    return sae


def test_interventions_check_the_sae_against_where_they_apply():
    v = tiny_vlm("llava")
    enc = v.adapter.build_inputs(v.processor, v.images(2, start=1), ["a red square", "a dog"])
    here = {"model_class": type(v.hf).__name__, "hook_name": v.adapter.hook_name(1)}
    at4 = _sae(v, layer=4, **{**here, "hook_name": v.adapter.hook_name(4)})
    with pytest.raises(ProvenanceError, match=r"the SAE of this Clamp was made for another context than layer 1 .*"
                                              r"\(layer 4 vs 1, hook_name .*\); use the SAE trained there"):
        with intervene(v.model, [Clamp(1, "image", sae=at4, features=[3], strength=5.0)], enc):
            pass
    qwen = _sae(v, layer=1, model_name="qwen3-vl-moe", model_class="Qwen3VLMoeForConditionalGeneration")
    with pytest.raises(ProvenanceError, match="model_class Qwen3VLMoeForConditionalGeneration vs LlavaForConditionalGeneration"):
        with intervene(v.model, [Splice(1, "text", sae=qwen)], enc):
            pass
    with intervene(v.model, [Clamp(1, "image", sae=at4, features=[3], strength=5.0, allow_other_site=True)], enc):
        pass  # explicitly allowed
    with intervene(v.model, [Clamp(1, "image", sae=_sae(v, layer=1, **here), features=[3], strength=5.0)], enc):
        pass  # the right site; an SAE without metadata is not checked either
    with intervene(v.model, [Clamp(1, "image", sae=_sae(v), features=[3], strength=5.0)], enc):
        pass


def test_a_second_forward_inside_intervene_is_edited_like_the_first():
    v = tiny_vlm("llava")
    enc = v.adapter.build_inputs(v.processor, v.images(2, start=1), ["a red square", "a dog"])
    kw = v.adapter.model_kwargs(enc)
    d = torch.randn(v.adapter.d_in, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        base = v.hf(**kw).logits
        with intervene(v.model, [Steer(1, "image", direction=d)], enc) as steps:
            first, second = v.hf(**kw).logits, v.hf(**kw).logits
    assert steps[1] == 2
    assert torch.equal(first, second) and not torch.allclose(first, base)


def test_labels_record_their_sae_and_refuse_another(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(40, 2, generator=g) > 0.5).float()
    z = torch.cat([y, torch.rand(40, 6, generator=g)], 1)
    sae = jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=8))
    sae.cfg.metadata["layer"], sae.cfg.metadata["model_name"] = 4, "llava"
    labels = label_features(z, z, y, ["cat", "dog"], provenance={"sae": sae_record(sae)})
    labels.save(tmp_path / "labels.json")
    back = FeatureLabels.load(tmp_path / "labels.json")
    assert back.provenance["sae"]["layer"] == 4
    back.check_sae(sae)
    other = jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=8))
    other.cfg.metadata["layer"], other.cfg.metadata["model_name"] = 2, "llava"
    with pytest.raises(ProvenanceError, match=r"this labels file was made for another context .*\(layer 4 vs 2\)"):
        back.check_sae(other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable jsae labels file"):
        FeatureLabels.load(tmp_path / "bad.json")
