"""Paired pooled capture: equality with a manual computation, early stop, shards, resume, reader."""

from __future__ import annotations

import re
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KINDS, assert_same_capture, tiny_vlm
from safetensors.torch import load_file

from jsae.capture import capture_batches, capture_pairs, image_token_count, pool, read_manifest, sae_metadata
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


# ---- bucketed batches ---------------------------------------------------------------------------


def _forwards(v):
    """A list that records, per forward, the image tokens of each row and the padded length (from the
    input ids the embedding reads), and the hook's handle."""
    seen = []
    image_id = v.adapter.image_token_id

    def record(module, args, output):
        ids = args[0]
        seen.append(((ids == image_id).sum(1).tolist(), ids.shape[1]))

    return seen, v.hf.get_input_embeddings().register_forward_hook(record)


@pytest.mark.parametrize("kind", ["llava_next", "qwen3_vl", "llava"])
def test_bucketed_batches_group_rows_by_image_tokens_and_keep_the_pairs_order(kind, tmp_path):
    v = tiny_vlm(kind)
    pairs = v.pairs(12)
    # the counts bucketing sorts by (the processor's settings, before any forward) are the tokens it writes
    counts = [image_token_count(v.adapter, v.processor, p) for p in pairs]
    assert counts == [int(v.adapter.image_token_mask(v.inputs(1, i)).sum()) for i in range(12)]
    kw = dict(layers=[0, 1], processor=v.processor, batch_size=2, shard_size=6, progress=False)
    runs = {}
    for bucket in (True, False):
        seen, handle = _forwards(v)
        try:
            capture_pairs(v.model, pairs, out_dir=tmp_path / str(bucket), bucket=bucket, **kw)
        finally:
            handle.remove()
        runs[bucket] = seen
        assert read_manifest(tmp_path / str(bucket))["bucket"] is bucket
    plan = [b for shard in capture_batches(12, 2, 6, counts) for b in shard]
    assert [rows for rows, _ in runs[True]] == [[counts[i] for i in b] for b in plan]
    assert [rows for rows, _ in runs[False]] == [counts[i:i + 2] for i in range(0, 12, 2)]
    assert all(rows == sorted(rows, reverse=True) for rows, _ in runs[True])  # largest first within a shard
    padded = {b: sum(len(rows) * length for rows, length in runs[b]) for b in runs}
    if len(set(counts)) > 1:
        assert padded[True] < padded[False]
    else:  # one image size: bucketing changes nothing, the batches are the unbucketed ones
        assert runs[True] == runs[False]
    capture_pairs(v.model, pairs, out_dir=tmp_path / "one", **{**kw, "batch_size": 1})  # no padding at all
    for layer in (0, 1):
        b = load_pairs(tmp_path / "True", layer, batch_size=12, shuffle=False)
        u = load_pairs(tmp_path / "False", layer, batch_size=12, shuffle=False)
        one = load_pairs(tmp_path / "one", layer, batch_size=12, shuffle=False)
        for got in (b, u):  # every row is its own pair's (order restored), up to float rounding of the padding
            torch.testing.assert_close(got.vision, one.vision, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.text, one.text, rtol=1e-5, atol=1e-6)
        assert torch.cdist(one.vision, one.vision).add(torch.eye(12)).min() > 1e-4  # rows are distinguishable
        if len(set(counts)) == 1:
            assert torch.equal(b.vision, u.vision) and torch.equal(b.text, u.text)
    # resuming keeps the capture's own setting; asking for the other one is refused
    capture_pairs(v.model, pairs, out_dir=tmp_path / "False", **kw)
    with pytest.raises(ValueError, match="bucket=False, not True"):
        capture_pairs(v.model, pairs, out_dir=tmp_path / "False", bucket=True, **kw)


def test_resume_adopts_complete_shards_the_manifest_does_not_list(tmp_path):
    """A rank killed between renaming its shard into place and rank 0's next manifest write leaves a complete
    shard the manifest does not list (here the middle one): resume keeps it without recomputing; a shard of
    another capture's plan at a missing shard's name is deleted and captured anew."""
    import json
    import shutil

    v = tiny_vlm("llava_next")
    pairs = v.pairs(10)
    kw = dict(layers=[0], processor=v.processor, batch_size=2, shard_size=4, progress=False)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "ref", **kw)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "other", pooling="max", **kw)
    shutil.copytree(tmp_path / "ref", tmp_path / "killed")
    path = tmp_path / "killed" / "manifest.json"
    m = json.loads(path.read_text())
    m["shards"] = [m["shards"][0]]  # shard 1 complete on disk but unlisted; shard 2 missing...
    m.update(count=4, complete=False)
    path.write_text(json.dumps(m))
    shutil.copy(tmp_path / "other" / "shard-00002.safetensors", tmp_path / "killed")  # ...with another plan's in its place
    seen, handle = _forwards(v)
    try:
        capture_pairs(v.model, pairs, out_dir=tmp_path / "killed", **kw)
    finally:
        handle.remove()
    assert len(seen) == 1  # shard 2 (pairs 8, 9) only
    got, ref = read_manifest(tmp_path / "killed"), read_manifest(tmp_path / "ref")
    assert got["complete"] and got["shards"] == ref["shards"] and got["count"] == 10
    for k in range(3):
        a = load_file(tmp_path / "killed" / f"shard-{k:05d}.safetensors")
        b = load_file(tmp_path / "ref" / f"shard-{k:05d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)


def test_capture_made_before_bucketing_resumes_unbucketed(tmp_path):
    """A manifest without ``bucket`` (an older capture: shards are whole batches of consecutive pairs, with no
    ``start``) resumes unbucketed, and its shards read back in order."""
    import json

    v = tiny_vlm("qwen3_vl")
    pairs = v.pairs(8)
    kw = dict(layers=[1], processor=v.processor, batch_size=2, shard_size=4, progress=False)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "ref", bucket=False, **kw)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "old", bucket=False, **kw)
    path = tmp_path / "old" / "manifest.json"
    m = json.loads(path.read_text())
    for key in ("bucket", "plan", "world_size"):
        del m[key]
    m["shards"] = [{"file": s["file"], "count": s["count"]} for s in m["shards"][:1]]
    m.update(count=4, complete=False)
    path.write_text(json.dumps(m))
    (tmp_path / "old" / "shard-00001.safetensors").unlink()
    capture_pairs(v.model, pairs, out_dir=tmp_path / "old", **kw)
    got = read_manifest(tmp_path / "old")
    assert got["complete"] and got["bucket"] is False and [s["start"] for s in got["shards"]] == [0, 4]
    a = load_pairs(tmp_path / "old", batch_size=8, shuffle=False)
    b = load_pairs(tmp_path / "ref", batch_size=8, shuffle=False)
    assert torch.equal(a.vision, b.vision) and torch.equal(a.text, b.text)


# ---- data parallel (torchrun, 2 gloo processes on the CPU) ---------------------------------------

SCRIPT = Path(__file__).parent / "scripts" / "capture_ranks.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), *args]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _same_capture(a: Path, b: Path) -> None:
    """Same manifest contents (fingerprint, plan, shards, count, bucketing) and bitwise the same shards."""
    assert_same_capture(a, b, ("fingerprint", "plan", "shards", "count", "complete", "bucket", "total"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The one-process capture the torchrun tests compare with: 14 pairs of mixed image sizes, bucketed
    batches of 2, shards of 4 (4 shards: ranks 0 and 1 get two each)."""
    out = tmp_path_factory.mktemp("one") / "cap"
    v = tiny_vlm("llava_next")
    capture_pairs(v.model, v.pairs(14), layers=[0, 1], out_dir=out, processor=v.processor, batch_size=2, shard_size=4,
                  progress=False)
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, one_process):
    res = _torchrun(str(SCRIPT), str(tmp_path / "ddp"), "llava_next", "14")
    # the two ranks share one stdout: their lines may interleave, so read the reports wherever they are
    forwards = sorted(re.findall(r"rank (\d+) forwards (\d+)", res.stdout))
    assert forwards == [("0", "4"), ("1", "3")], res.stdout[-2000:]  # shards 0, 2 | 1, 3 (2 pairs)
    _same_capture(tmp_path / "ddp", one_process)
    m = read_manifest(tmp_path / "ddp")
    assert m["world_size"] == 2 and m["bucket"] and len(m["fingerprint"]) == 32
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["manifest.json"] + [
        f"shard-{k:05d}.safetensors" for k in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("killed,resume_ranks", [(1, 2), (0, 1)])
def test_torchrun_killed_rank_resumes_under_any_world_size(tmp_path, one_process, killed, resume_ranks):
    """One rank SIGKILLed inside its 3rd forward (its first shard written, its second begun); torchrun stops
    the other.  The capture resumes under 2 ranks or 1 process and equals the one-process capture."""
    out = tmp_path / "cap"
    res = _torchrun(str(SCRIPT), str(out), "llava_next", "14", "--kill-rank", str(killed), "--kill-at", "3", check=False)
    assert res.returncode != 0
    m = read_manifest(out)
    assert not m["complete"] and m["count"] < 14
    assert (out / f"shard-{killed:05d}.safetensors").exists()  # the killed rank's first shard was written
    if resume_ranks == 2:
        res = _torchrun(str(SCRIPT), str(out), "llava_next", "14")
        ran = sum(int(line.split()[-1]) for line in res.stdout.splitlines() if line.startswith("rank "))
    else:
        v = tiny_vlm("llava_next")
        seen, handle = _forwards(v)
        try:
            capture_pairs(v.model, v.pairs(14), layers=[0, 1], out_dir=out, processor=v.processor, batch_size=2,
                          shard_size=4, progress=False)
        finally:
            handle.remove()
        ran = len(seen)
    assert ran <= 7 - 2  # the killed rank's written shard (2 batches) is not captured again
    _same_capture(out, one_process)


@pytest.mark.slow
def test_torchrun_command_line_equals_the_api_in_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 --no-python jsae run capture ...` on the shipped toy model and world data
    gives the shards and fingerprint of `capture_pairs` in one process (``--pairs``: torchrun's own parser
    refuses ``--n`` as an ambiguous abbreviation of its options)."""
    from jsae import load_vlm
    from jsae.data.sources import WorldSource

    jsae_cli = Path(sys.executable).parent / "jsae"
    _torchrun("--no-python", str(jsae_cli), "run", "capture", "--model", "llava", "--layers", "1", "--pairs", "10",
              "--batch-size", "2", "--shard-size", "2", "--out", str(tmp_path / "ddp"))
    source = WorldSource.split("train", 10, 0)
    model, processor, adapter = load_vlm("llava")
    capture_pairs(model, source.pairs("train"), layers=[1], out_dir=tmp_path / "one", processor=processor,
                  adapter=adapter, batch_size=2, shard_size=2, fingerprint=source.fingerprint("train"), progress=False)
    _same_capture(tmp_path / "ddp", tmp_path / "one")
    assert read_manifest(tmp_path / "ddp")["world_size"] == 2


@pytest.mark.slow
def test_torchrun_ranks_given_other_pairs_all_refuse_before_capturing(tmp_path):
    res = _torchrun(str(SCRIPT), str(tmp_path / "cap"), "llava_next", "8", "--last-rank-n", "7", check=False)
    assert res.returncode != 0
    errors = sorted(line for line in res.stdout.splitlines() if " error: " in line)
    msg = ("rank 1 of 2: rank 1 was given total=7 but rank 0 8; call capture_pairs with the same pairs and arguments "
           "on every rank")
    assert errors == [f"rank 0 error: {msg}", f"rank 1 error: {msg}"]
    assert not list((tmp_path / "cap").glob("shard-*"))  # refused before any forward

@pytest.mark.parametrize("text_positions", ["caption", "non_image"])
def test_per_token_text_states_are_what_the_capture_pools(text_positions, tmp_path):
    """``text_token_states`` (the per-token text FVU of ``sae_metrics``) holds exactly the tokens the capture's
    text view averages: per pair, their mean is the captured text pool."""
    from jsae.capture import read_layer
    from jsae.protocol.sweep import text_token_states

    v = tiny_vlm("llava")
    pairs = v.pairs(3)
    capture_pairs(v.model, pairs, layers=[1], out_dir=tmp_path, processor=v.processor, batch_size=3, progress=False,
                  text_positions=text_positions)
    _, pooled, _ = read_layer(tmp_path, 1)
    per_pair = [text_token_states((v.model, v.processor, v.adapter), [p], 1, text_positions=text_positions) for p in pairs]
    enc = v.adapter.build_inputs(v.processor, *map(list, zip(*pairs)))
    mask = v.adapter.caption_token_mask(enc) if text_positions == "caption" else v.adapter.non_image_token_mask(enc)
    assert [t.shape[0] for t in per_pair] == mask.sum(1).tolist()
    torch.testing.assert_close(torch.stack([t.mean(0) for t in per_pair]), pooled.float(), atol=1e-5, rtol=1e-4)
    together = text_token_states((v.model, v.processor, v.adapter), pairs, 1, text_positions=text_positions)
    assert together.shape == (int(mask.sum()), v.adapter.d_in)


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl"])
def test_batches_shared_with_a_forked_process_give_the_same_capture(kind, tmp_path):
    """``batch_map`` = jsae.parallel.forked_map with two processes: every shard bitwise what one process writes,
    both processes computed batches, and a bad pair in a later batch is the same one-line error, nothing left."""
    import os

    from jsae.parallel import forked_map

    v = tiny_vlm(kind)
    pairs = v.pairs(14)
    kw = dict(layers=[0, 1], processor=v.processor, batch_size=2, shard_size=6, progress=False)
    capture_pairs(v.model, pairs, out_dir=tmp_path / "one", **kw)
    pids, seen = [], []

    def two(fn, spans, done):
        def tagged(lo, hi):
            return fn(lo, hi), os.getpid()
        out = forked_map(tagged, spans, 2, lambda span: seen.append(span) or done(span))
        pids.extend(p for _, p in out)
        return [r for r, _ in out]

    capture_pairs(v.model, pairs, out_dir=tmp_path / "two", batch_map=two, **kw)
    assert_same_capture(tmp_path / "one", tmp_path / "two", keys=("fingerprint", "plan", "shards", "count", "complete",
                                                                   "context_size"))
    # 3 + 3 + 1 batches of 2 pairs; a shard of one batch stays in this process, the others fork a child each
    assert os.getpid() in pids and len(set(pids)) >= 2 and len(seen) == len(pids) == 7
    bad = pairs[:9] + [(pairs[1][0], "")] + pairs[10:]
    with pytest.raises(ValueError, match=r"^pair 9: the caption is empty"):
        capture_pairs(v.model, bad, out_dir=tmp_path / "bad", bucket=False, batch_map=two, **kw)
    assert not (tmp_path / "bad").exists()
