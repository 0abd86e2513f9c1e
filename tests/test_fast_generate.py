"""The fast generation path (own greedy loop that drops ended captions, shared prefills, gathered encodings, the
sweep's pooled position sets) gives exactly what the straightforward path gives: transformers' ``generate`` on
every row, one position set at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vlm

from jsae import parallel
from jsae.adapters import unwrap
from jsae.interventions import Steer, generate

LAYER = 1


@pytest.fixture(scope="module")
def toy():
    """The shipped toy LLaVA (a trained model: its captions end at different lengths) and a few world images."""
    from jsae.data.sources import WorldSource
    from jsae.protocol.config import ProtocolConfig, world_prompts
    from jsae.protocol.stages import captioner_for
    from jsae.vlm import load_vlm

    vlm = load_vlm("llava")
    cfg = world_prompts(ProtocolConfig(max_new_tokens=20, gen_batch=24), vlm.processor)
    images = [ex["image"] for ex in WorldSource.protocol(8, 8, 8, 0).items("eval")[:6]]
    return vlm, captioner_for(cfg, vlm), images


def _plain(adapter, monkeypatch):
    """Force transformers' own generate loop (the straightforward path) for ``adapter``'s model."""
    monkeypatch.setattr(adapter, "generation_position_ids", lambda mask: None)


def _rows(images, n_dirs=4, seed=0):
    """Rows of a dose-response grid: every image at every (direction, strength), images repeated."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, 128, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    strengths = torch.tensor([0.0, 2.0, 8.0, 30.0])
    rows = [(i, d, s) for d in range(n_dirs) for s in range(len(strengths)) for i in range(len(images))]
    D = torch.stack([dirs[d] * strengths[s] for _, d, s in rows])
    return rows, D


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["image", "generated", "image+generated"])
def test_fast_captions_equal_hf_generate(toy, positions, monkeypatch):
    """Per-prompt steering at each position set, images repeated across rows and captions of many lengths: the fast
    path's captions are transformers' generate's, caption for caption."""
    from jsae.protocol.sweep import steer_interventions

    vlm, caption, images = toy
    rows, D = _rows(images)
    imgs = [images[i] for i, _, _ in rows]
    ones = torch.ones(len(rows))
    make = lambda a, b: steer_interventions(2, positions, D[a:b], ones[a:b])  # noqa: E731
    forwards: list[tuple[int, ...]] = []
    hook = unwrap(vlm.model).register_forward_pre_hook(
        lambda m, a, k: forwards.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    try:
        fast = caption(imgs, make)
        fast_forwards = list(forwards)
        with monkeypatch.context() as m:
            _plain(vlm.adapter, m)
            forwards.clear()
            plain = caption(imgs, make)
    finally:
        hook.remove()
    assert fast == plain
    assert len({len(c.split()) for c in fast}) > 2  # captions of several lengths: rows were dropped as they ended
    # the fast path ran fewer rows: prefills shared (generated: one per image) and ended captions dropped
    assert sum(r for r, _ in fast_forwards) < sum(r for r, _ in forwards)
    if positions == "generated":
        assert fast_forwards[0][0] == len(images)  # one prefill per distinct image
    assert min(r for r, _ in fast_forwards[1:]) < len(rows) // 2  # the batch shrank as captions ended


@pytest.mark.slow
def test_pooled_position_sets_equal_one_set_at_a_time(toy):
    """The sweep's pooled batches (every position set of a direction in one batch, shared prefills) give the captions
    of running each position set on its own."""
    from jsae.protocol.sweep import SweepConfig, SweepImages, pooled_steer, run_rows, steer_rows

    vlm, caption, images = toy

    class Judge:  # the sweep needs presence only to pick images; every image is a row here
        concepts = ["x"]

        def presence(self, items):
            return torch.zeros(len(items), 1)

    sweep = SweepImages(caption, images, [{}] * len(images), Judge(), SweepConfig(layers=[2], concepts=["x"]))
    rows, D = _rows(images, n_dirs=2, seed=1)
    rows = [(i, d, s) for i, d, s in rows]
    sets = ("image", "generated", "image+generated")

    class Bar:
        def update(self, n):
            pass

    pooled = run_rows(sweep, [r for r in rows for _ in sets], pooled_steer(2, sets, D), Bar())
    for k, pos in enumerate(sets):
        alone = run_rows(sweep, rows, steer_rows(2, pos, D, torch.ones(len(rows))), Bar())
        assert pooled[k::len(sets)] == alone, pos


def test_padded_batch_equals_hf_generate(monkeypatch):
    """A left-padded batch of two different prompts (tiny random LLaVA), steered per prompt at every step: the own
    loop's token ids are generate's."""
    v = tiny_vlm("llava")
    enc = v.adapter.build_inputs(v.processor, v.images(2, start=1), ["a red", "what color is the big cat"],
                                 add_generation_prompt=True)
    assert not bool(enc["attention_mask"].all())  # padded
    d = torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 20
    ivs = [Steer(LAYER, "all", direction=d, strength=[1.0, 0.5])]
    fast = generate(v.model, enc, ivs, max_new_tokens=6, adapter=v.adapter, return_ids=True)
    _plain(v.adapter, monkeypatch)
    plain = generate(v.model, enc, ivs, max_new_tokens=6, adapter=v.adapter, return_ids=True)
    assert torch.equal(fast, plain)


def test_gathered_encoding_is_the_batch_encoding(toy):
    """A batch that repeats images is encoded once per distinct image and gathered: the very tensors the processor
    gives for the whole batch."""
    vlm, caption, images = toy
    chunk = [images[i] for i in (0, 1, 0, 2, 1, 0)]
    text = vlm.adapter.render_prompt(vlm.processor, caption.prompt, 1, add_generation_prompt=True)
    got = caption._encode(chunk, text)
    want = vlm.processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_steer_prompt_key():
    """Rows steered alike at prefill have equal keys; strength 0 is 'unchanged' whatever the direction."""
    d = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    s = Steer(0, "image", timing="prefill", direction=d, strength=[2.0, 2.0, 2.0, 0.0])
    assert s.prompt_key(0) == s.prompt_key(1) != s.prompt_key(2)
    assert s.prompt_key(3) == "unchanged"
    assert not Steer(0, "generated", direction=d[0]).edits_prompt and s.edits_prompt


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 2, 7])
def test_layers_below_the_edit_run_once_per_image(toy, layer, monkeypatch):
    """Edits at decoder layer ``layer`` (per-prompt steering and per-prompt projection at image tokens, neither shared
    between rows; at the last layer, 7, at the last prompt token, the only state read there): the layers below
    ``layer`` and the vision tower run once per distinct image, and the captions are transformers' generate's."""
    from jsae.interventions import ProjectOut

    vlm, caption, images = toy
    rows, D = _rows(images, n_dirs=2, seed=2)
    imgs = [images[i] for i, _, _ in rows]
    ones = torch.ones(len(rows))
    P = D.flip(-1) + 1e-3  # another direction (non-zero for ProjectOut)

    at = "last" if layer == 7 else "image"

    def make(a, b):
        return [Steer(layer, at, timing="prefill", direction=D[a:b], strength=ones[a:b] * 3),
                ProjectOut(layer, at, timing="prefill", direction=P[a:b])]

    prefill_rows: list[int] = []
    edited_rows: list[int] = []

    def count(into):  # rows of each prefill a layer computed
        def after(m, a, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.shape[1] > 1:
                into.append(int(h.shape[0]))
        return after

    bottom = vlm.adapter.layer_module(0).register_forward_hook(count(prefill_rows))
    at_edit = vlm.adapter.layer_module(layer).register_forward_hook(count(edited_rows))
    towers: list[int] = []
    tower = unwrap(vlm.adapter.vision_tower).register_forward_pre_hook(lambda m, a: towers.append(int(a[0].shape[0])))
    try:
        fast = caption(imgs, make)
        fast_prefills, fast_towers, fast_edited = list(prefill_rows), list(towers), list(edited_rows)
        with monkeypatch.context() as m:
            _plain(vlm.adapter, m)
            plain = caption(imgs, make)
    finally:
        bottom.remove()
        at_edit.remove()
        tower.remove()
    assert fast == plain
    assert len(set(fast)) > len(images)  # the edits changed captions
    batches = [len(rows[i:i + caption.batch_size]) for i in range(0, len(rows), caption.batch_size)]
    distinct = [len({rows[j][0] for j in range(i, min(i + caption.batch_size, len(rows)))})
                for i in range(0, len(rows), caption.batch_size)]
    assert fast_towers == distinct and sum(fast_towers) < sum(batches)
    assert fast_prefills == distinct  # layer 0 at prefill: one row per distinct image
    assert fast_edited == distinct  # the edited layer too (its edit applied to the gathered rows)


def test_padded_repeated_prompts_below_the_edit_equal_hf_generate(monkeypatch):
    """Left-padded prompts, each twice, edited per row at two layers at every position and step (tiny random LLaVA):
    the layers below the first edit run once per distinct prompt, and the token ids are generate's."""
    v = tiny_vlm("llava")
    imgs = v.images(2, start=1)
    enc = v.adapter.build_inputs(v.processor, [imgs[0], imgs[1], imgs[0], imgs[1]],
                                 ["a red", "what color is the big cat", "a red", "what color is the big cat"],
                                 add_generation_prompt=True)
    assert not bool(enc["attention_mask"].all())  # padded
    d = torch.randn(4, 32, generator=torch.Generator().manual_seed(4)) * 20
    ivs = [Steer(LAYER, "all", direction=d, strength=[1.0, 0.5, 0.0, 2.0]),
           Steer(LAYER + 1, "image", timing="prefill", direction=d.flip(0), strength=[0.3, 0.3, 1.0, 1.0])]
    rows: list[int] = []
    h = v.adapter.layer_module(0).register_forward_pre_hook(
        lambda m, a, k: rows.append(int((a[0] if a else k["hidden_states"]).shape[0])), with_kwargs=True)
    try:
        fast = generate(v.model, enc, ivs, max_new_tokens=6, adapter=v.adapter, return_ids=True, same_prompt=[0, 1, 0, 1])
    finally:
        h.remove()
    assert rows[0] == 2  # the prefill below layer LAYER: one row per distinct prompt
    _plain(v.adapter, monkeypatch)
    plain = generate(v.model, enc, ivs, max_new_tokens=6, adapter=v.adapter, return_ids=True)
    assert torch.equal(fast, plain)


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


@pytest.mark.slow
def test_sweep_batches_in_two_processes_equal_one(toy, monkeypatch):
    """The sweep's caption batches shared with a forked second process give the captions, in order, of one process
    running them all (the same batches), and the progress bar counts every row."""
    from jsae.protocol import sweep as sw

    vlm, caption, images = toy
    rows, D = _rows(images, seed=7)
    ones = torch.ones(len(rows))
    make = lambda a, b: sw.steer_interventions(2, "image+generated", D[a:b], ones[a:b])  # noqa: E731

    class Sweep:
        pass

    s = Sweep()
    s.caption, s.images = caption, images
    monkeypatch.setattr(caption, "batch_size", 20)  # 96 rows: 5 batches
    got = {}
    for n in (1, 2):
        monkeypatch.setattr(parallel, "WORKERS", n)
        bar = _Bar()
        got[n] = sw.run_rows(s, rows, make, bar)
        assert bar.n == len(rows)
    assert got[2] == got[1] and len(got[1]) == len(rows)
    assert len(set(got[1])) > len(images)


def test_run_parts_batches_each_part_as_run_rows(monkeypatch):
    """run_parts cuts each part into run_rows's batches (a batch never mixes parts) and returns the parts' captions one
    after another, the same with one process and two."""
    from jsae.protocol import sweep as sw

    calls = []

    class Caption:
        batch_size = 3

        def __call__(self, images, make):
            calls.append(len(images))
            return [f"{im}:{tag}" for im, tag in zip(images, make(0, len(images)))]

    class Sweep:
        caption, images = Caption(), [f"im{i}" for i in range(10)]

    parts = [([(i, 0, 0) for i in range(7)], lambda lo, hi: [f"a{j}" for j in range(lo, hi)]),
             ([(i, 0, 0) for i in (9, 8, 7, 6)], lambda lo, hi: [f"b{j}" for j in range(lo, hi)])]
    want = [f"im{i}:a{i}" for i in range(7)] + [f"im{i}:b{j}" for j, i in enumerate((9, 8, 7, 6))]
    for n in (1, 2):
        monkeypatch.setattr(parallel, "WORKERS", n)
        calls.clear()
        bar = _Bar()
        assert sw.run_parts(Sweep(), parts, bar) == want
        assert bar.n == 11
        if n == 1:
            assert calls == [3, 3, 1, 3, 1]  # each part in batches of 3, the last of each part shorter


