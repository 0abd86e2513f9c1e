"""Paired pooled capture: equality with a manual computation, early stop, shards, resume, reader."""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS, tiny_vlm
from safetensors.torch import load_file

from jsae.capture import capture_pairs, pool, read_manifest, sae_metadata
from jsae.training import PairedActivations, load_pairs


def _manual(v, pairs, layer, pooling):
    """Pooled states from a plain HF forward with output_hidden_states (no nnsight, no jsae capture)."""
    images, texts = map(list, zip(*pairs))
    enc = v.adapter.build_inputs(v.processor, images, texts)
    with torch.no_grad():
        hs = v.hf(**v.adapter.model_kwargs(enc), output_hidden_states=True).hidden_states[layer + 1]
    out = {}
    for name, mask in (("vision", v.adapter.image_token_mask(enc)), ("text", v.adapter.caption_token_mask(enc))):
        rows = []
        for b in range(hs.shape[0]):
            sel = hs[b][mask[b]]
            rows.append({"mean": sel.mean(0), "max": sel.max(0).values, "last": sel[-1]}[pooling])
        out[name] = torch.stack(rows)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_capture_equals_manual_hidden_states_and_stops_early(kind, tmp_path):
    v = tiny_vlm(kind)
    pairs = v.pairs(3)
    ran = []
    handle = v.hf.model.language_model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        capture_pairs(v.model, pairs, layers=[1, 0], out_dir=tmp_path, processor=v.processor, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert ran == []  # layer 2 never ran: the forward stopped after layer 1
    for layer in (0, 1):
        data = load_pairs(tmp_path, layer, batch_size=3, shuffle=False)
        want = {k: torch.cat([_manual(v, pairs[:2], layer, "mean")[k], _manual(v, pairs[2:], layer, "mean")[k]])
                for k in ("vision", "text")}
        torch.testing.assert_close(data.vision, want["vision"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(data.text, want["text"], rtol=1e-5, atol=1e-6)
    m = read_manifest(tmp_path)
    assert m["count"] == 3 and m["complete"] and m["layers"] == [0, 1] and m["pooling"] == "mean"
    assert m["hook_names"] == ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert m["dtype"] == "float32" and len(m["fingerprint"]) == 32 and m["model_class"] == type(v.hf).__name__
    # what SAELens's evals read, for the SAEs trained on it: BOS, the longest prompt captured, the data's path
    encs = [v.adapter.build_inputs(v.processor, *map(list, zip(*chunk))) for chunk in (pairs[:2], pairs[2:])]
    longest = max(int(e["attention_mask"].sum(1).max()) for e in encs)
    bos = v.processor.tokenizer("a").input_ids[0] == v.processor.tokenizer.bos_token_id
    assert (m["context_size"], m["prepend_bos"], m["dataset_path"]) == (longest, bos, None)
    meta = sae_metadata(tmp_path, 1)
    assert {k: meta.get(k) for k in ("hook_name", "layer", "context_size", "prepend_bos")} == {
        "hook_name": "model.language_model.layers.1", "layer": 1, "context_size": longest, "prepend_bos": bos}


@pytest.mark.parametrize("pooling", ["max", "last"])
def test_pooling_modes(pooling, tmp_path):
    v = tiny_vlm("qwen3_vl")
    pairs = v.pairs(2)
    capture_pairs(v.model, pairs, layers=2, pooling=pooling, out_dir=tmp_path, processor=v.processor, progress=False)
    data = load_pairs(tmp_path, batch_size=2, shuffle=False)
    want = _manual(v, pairs, 2, pooling)  # last layer: compare with a hook, hidden_states[-1] is post-norm
    got = {}
    h = v.hf.model.language_model.layers[2].register_forward_hook(lambda m, a, o: got.setdefault("h", o))
    try:
        enc = v.adapter.build_inputs(v.processor, *map(list, zip(*pairs)))
        with torch.no_grad():
            v.hf(**v.adapter.model_kwargs(enc))
    finally:
        h.remove()
    torch.testing.assert_close(data.vision, pool(got["h"], v.adapter.image_token_mask(enc), pooling))
    assert not torch.allclose(data.vision, want["vision"])  # hidden_states[-1] is normed: a different thing


def test_pooling_outside_the_trace_and_other_wrappers(tmp_path):
    """The remote path (save layer outputs, pool locally) gives the same vectors; so do a bare
    transformers model and an nnsight TransformersModel wrapper."""
    from nnsight import TransformersModel

    from jsae.activations import read_layers
    from jsae.capture import _capture_batch

    v = tiny_vlm("qwen3_vl_moe")
    enc = v.inputs(2)
    inside = _capture_batch(v.model, v.adapter, enc, [0, 2], "max")
    states = read_layers(v.model, v.adapter, enc, [0, 2])  # what the remote path saves, pooled here
    outside = {f"layer_{L}.{m}": pool(states[L], mask, "max") for L in (0, 2)
               for m, mask in (("vision", v.adapter.image_token_mask(enc)), ("text", v.adapter.caption_token_mask(enc)))}
    assert inside.keys() == outside.keys() and all(torch.equal(inside[k], outside[k]) for k in inside)
    pairs = v.pairs(3)
    kw = dict(layers=[1], processor=v.processor, batch_size=2, progress=False)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "nnsight", **kw)
    capture_pairs(v.hf, pairs, out_dir=tmp_path / "bare", **kw)
    capture_pairs(TransformersModel(v.hf, tokenizer=v.processor.tokenizer), pairs, out_dir=tmp_path / "tm", **kw)
    ref = load_pairs(tmp_path / "nnsight", batch_size=3, shuffle=False)
    for other in ("bare", "tm"):
        got = load_pairs(tmp_path / other, batch_size=3, shuffle=False)
        assert torch.equal(got.vision, ref.vision) and torch.equal(got.text, ref.text)


def test_full_forward_equals_early_stop(tmp_path):
    v = tiny_vlm("llava_next")
    pairs = v.pairs(2)
    capture_pairs(v.model, pairs, layers=[0], out_dir=tmp_path / "early", processor=v.processor, progress=False)
    capture_pairs(v.model, pairs, layers=[0, 2], out_dir=tmp_path / "full", processor=v.processor, progress=False)
    a = load_file(tmp_path / "early" / "shard-00000.safetensors")
    b = load_file(tmp_path / "full" / "shard-00000.safetensors")
    assert torch.equal(a["layer_0.vision"], b["layer_0.vision"]) and torch.equal(a["layer_0.text"], b["layer_0.text"])


def test_resume_after_kill_is_exact(tmp_path):
    v = tiny_vlm("llava")
    pairs = v.pairs(11)
    kw = dict(layers=[0, 1], processor=v.processor, batch_size=2, shard_size=4, progress=False)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "once", **kw)
    calls = []

    def kill_at_fifth_batch(*args):  # the job dies inside the 5th forward (pairs 8..9)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")

    handle = v.hf.model.language_model.layers[0].register_forward_hook(kill_at_fifth_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            capture_pairs(v.model, pairs, out_dir=tmp_path / "resumed", **kw)
    finally:
        handle.remove()
    m = read_manifest(tmp_path / "resumed")
    assert m["count"] == 8 and not m["complete"] and len(m["shards"]) == 2
    # a shard renamed into place but not yet in the manifest (killed in between) and a temp file
    (tmp_path / "resumed" / "shard-00002.safetensors").write_bytes(b"partial")
    (tmp_path / "resumed" / "shard-00003.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(ValueError, match="incomplete"):
        load_pairs(tmp_path / "resumed", 0)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "resumed", **kw)
    m = read_manifest(tmp_path / "resumed")
    assert m["count"] == 11 and m["complete"] and [s["count"] for s in m["shards"]] == [4, 4, 3]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for layer in (0, 1):
        a = load_pairs(tmp_path / "once", layer, batch_size=11, shuffle=False)
        b = load_pairs(tmp_path / "resumed", layer, batch_size=11, shuffle=False)
        assert torch.equal(a.vision, b.vision) and torch.equal(a.text, b.text)
    # a finished capture is not redone; different settings are refused
    before = (tmp_path / "resumed" / "manifest.json").read_text()
    capture_pairs(v.model, pairs, out_dir=tmp_path / "resumed", **kw)
    assert (tmp_path / "resumed" / "manifest.json").read_text() == before
    with pytest.raises(ValueError, match="pooling='mean', not 'max'"):
        capture_pairs(v.model, pairs, out_dir=tmp_path / "resumed", **{**kw, "pooling": "max"})
    with pytest.raises(ValueError, match="fingerprint"):
        capture_pairs(v.model, pairs[::-1], out_dir=tmp_path / "resumed", **kw)


def test_reader_contract(tmp_path):
    v = tiny_vlm("qwen3_vl")
    pairs = v.pairs(7)
    capture_pairs(v.model, pairs, layers=[1], out_dir=tmp_path, processor=v.processor, batch_size=3, shard_size=3, progress=False)
    flat = load_pairs(tmp_path, 1, batch_size=7, shuffle=False)
    data = load_pairs(tmp_path, 1, batch_size=2, seed=3)
    assert isinstance(data, PairedActivations) and len(data) == 3 and data.d_in == 32
    e0, e1 = list(data), list(data)  # two epochs: different orders, each a permutation without repeats
    for epoch in (e0, e1):
        assert all(vb.shape == (2, 32) and tb.shape == (2, 32) for vb, tb in epoch)
        rows = torch.cat([vb for vb, _ in epoch])
        idx = [int((flat.vision == r).all(1).nonzero()) for r in rows]
        assert len(set(idx)) == 6
        text_rows = torch.cat([tb for _, tb in epoch])
        assert torch.equal(text_rows, flat.text[idx])  # vision and text of the same pairs, same order
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e0, e1))
    again = load_pairs(tmp_path, 1, batch_size=2, seed=3)
    it = again.batches(4)  # global index 4 = epoch 1, batch 1
    assert torch.equal(next(it)[0], e1[1][0]) and torch.equal(next(it)[0], e1[2][0])
    assert torch.equal(next(it)[0], next(again.batches(6))[0])  # and on into epoch 2


def test_bad_capture_inputs(tmp_path):
    v = tiny_vlm("llava")
    pairs = v.pairs(2)
    kw = dict(processor=v.processor, progress=False)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        capture_pairs(v.model, pairs, layers=[3], out_dir=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        capture_pairs(v.model, pairs, layers=[0], pooling="median", out_dir=tmp_path / "b", **kw)
    with pytest.raises(ValueError, match=r"pair 3: the caption is empty"):
        capture_pairs(v.model, pairs + [pairs[0], (pairs[1][0], "")], layers=[0], batch_size=2, out_dir=tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()  # a fresh capture of bad data leaves nothing that would refuse the fixed data
    with pytest.raises(ValueError, match="needs the model's processor"):
        capture_pairs(v.model, pairs, layers=[0], out_dir=tmp_path / "d", progress=False)
    with pytest.raises(TypeError, match="sequence"):
        capture_pairs(v.model, iter(pairs), layers=[0], out_dir=tmp_path / "e", **kw)
    with pytest.raises(FileNotFoundError, match="run jsae.capture_pairs"):
        load_pairs(tmp_path / "nothing", 0)
