"""nnsight users, first class: jsae imports after nnsight, ``load_vlm`` returns a model whose own ``trace`` and
``generate`` contexts work, SAE features can be edited inside the user's own ``model.generate`` trace, and a
release's labels have a public accessor."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Mapping

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from jsae.guards import TypeCheckError, check_types, typechecked


def test_import_nnsight_and_saelens_evals_then_jsae() -> None:
    """The order most scripts use: nnsight's ``.save`` mount still works after jsae's import, jsae's shape checks
    still run, and the SAELens module imported first (``sae_lens.evals``) sees the jsae releases in the directory."""
    code = ("import nnsight, torch\nimport sae_lens.evals as ev\nimport jsae, sys\n"
            "assert 'beartype' not in sys.modules\n"
            "assert hasattr(torch.ones(1), 'save') and hasattr(object(), 'save')\n"
            "print('directory:', 'jsae-shapes-llava-l4' in ev.get_pretrained_saes_directory())\n"
            "sae = jsae.JointSAE.from_pretrained('jsae-shapes-llava-l4')\n"
            "try:\n    sae.encode(torch.ones(2, 3))\nexcept ValueError as e:\n    print('checked:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "directory: True" in out.stdout
    assert "checked: activations have last dimension 3 but this JSAE has d_in=128" in out.stdout


def test_check_types_accepts_and_rejects() -> None:
    @typechecked
    def f(x: Float[Tensor, "n d"], y: Float[Tensor, "n"] | None = None, m: Mapping[str, Any] | None = None,
          *rest: int) -> Float[Tensor, "d"]:
        return x.sum(0)

    assert torch.equal(f(torch.ones(2, 3)), torch.full((3,), 2.0))
    f(torch.ones(2, 3), torch.ones(2), {"a": 1}, 1, 2)
    for bad in [(torch.ones(2, 3), torch.ones(3)),                 # n bound to 2 by x, 3 here
                (torch.ones(2, 3, dtype=torch.long),),              # not float
                (torch.ones(2, 3), None, [1]),                     # not a mapping
                (torch.ones(2, 3), None, None, 1, "two")]:         # *rest holds a str
        with pytest.raises(Exception) as e:
            f(*bad)
        assert "TypeCheckError" in type(e.value).__name__

    @check_types
    def g(x: int) -> str:
        return x  # type: ignore[return-value]

    with pytest.raises(TypeCheckError, match="must return"):
        g(1)
    with pytest.raises(TypeCheckError, match="x must be"):
        g("1")  # type: ignore[arg-type]


# ---- nnsight's own contexts on jsae's model ---------------------------------------------------------

MODELS = ("llava", "qwen3-vl-moe")
LAYER = 4


@pytest.fixture(scope="module", params=MODELS)
def vlm(request: pytest.FixtureRequest):
    import jsae

    return request.param, jsae.load_vlm(request.param)


@pytest.mark.slow
def test_nnsight_trace_and_generate_contexts_on_load_vlm(vlm) -> None:
    import nnsight

    import jsae
    from jsae.world import world_dataset
    from jsae.world.processors import CAPTION_PROMPT

    name, (model, processor, adapter) = vlm
    assert isinstance(model, nnsight.TransformersModel) and model.processor is processor
    images = [e["image"] for e in world_dataset("test", 3, seed=4)]
    inputs = adapter.build_inputs(processor, images, [CAPTION_PROMPT] * 3, add_generation_prompt=True)
    kwargs = adapter.model_kwargs(inputs)
    with model.trace(**kwargs):
        h = adapter.layers[LAYER].output.save()
    assert torch.equal(h, jsae.activations.read_layers(model, adapter, inputs, [LAYER])[LAYER])
    with model.generate(**kwargs, max_new_tokens=6, do_sample=False) as tracer:
        ids = tracer.result.save()
    new = ids[:, kwargs["input_ids"].shape[1]:]
    assert torch.equal(new, jsae.generate(model, inputs, max_new_tokens=6, return_ids=True))


@pytest.mark.slow
def test_editing_sae_features_inside_your_own_generate_trace_equals_jsaes_clamp(vlm) -> None:
    """The README's recipe: clamp SAE features at the image tokens inside ``model.generate(...)``'s prefill step,
    with the JSAE routed (image tokens through the vision branch), error term kept; the captions equal
    ``jsae.generate`` with ``jsae.Clamp(..., timing="prefill")``."""
    import jsae
    from jsae.world import world_dataset
    from jsae.world.processors import CAPTION_PROMPT

    name, (model, processor, adapter) = vlm
    sae = jsae.JointSAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    labels = jsae.load_labels(sae)
    concept = next(lab.label for lab in labels.labels if lab.kind in ("shared", "vision-only"))
    feats = labels.features_for(concept, ("shared", "vision-only"))[:2]
    images = [e["image"] for e in world_dataset("test", 4, seed=6)]
    inputs = adapter.build_inputs(processor, images, [CAPTION_PROMPT] * 4, add_generation_prompt=True)
    kwargs, image = adapter.model_kwargs(inputs), adapter.image_token_mask(inputs)
    h = jsae.activations.read_layers(model, adapter, inputs, [LAYER])[LAYER]
    value = 4.0 * float(sae.encode(h[image], "vision")[:, feats].max().detach())
    with torch.no_grad(), model.generate(**kwargs, max_new_tokens=10, do_sample=False) as tracer:
        for _ in tracer.iter[:1]:                             # step 0: the prompt (prefill)
            hidden = adapter.layers[LAYER].output
            with sae.routing(image):
                z = sae.encode(hidden)
                edited = z.clone()
                edited[..., feats] = torch.where(image[..., None], torch.full_like(z[..., feats], value), z[..., feats])
                adapter.layers[LAYER].output = hidden + sae.decode(edited) - sae.decode(z)
        ids = tracer.result.save()
    mine = processor.tokenizer.batch_decode(ids[:, kwargs["input_ids"].shape[1]:], skip_special_tokens=True)
    theirs = jsae.generate(model, inputs, [jsae.Clamp(LAYER, "image", sae=sae, features=feats, strength=value,
                                                      timing="prefill")], max_new_tokens=10, processor=processor)
    assert mine == theirs
    assert mine != jsae.generate(model, inputs, max_new_tokens=10, processor=processor)


def test_load_labels_of_a_release_a_folder_and_a_loaded_sae(tmp_path) -> None:
    import shutil

    import jsae
    from jsae.releases.registry import release_file
    from sae_lens import SAE

    by_name = jsae.load_labels("jsae-shapes-llava-l4")
    folder = release_file("jsae-shapes-llava-l4").parent
    assert [lab.label for lab in jsae.load_labels(folder).labels] == [lab.label for lab in by_name.labels]
    assert len(by_name.labels) == jsae.JointSAE.from_pretrained("jsae-shapes-llava-l4").cfg.d_sae
    loaded = SAE.from_pretrained("jsae-shapes-llava-l4")
    assert jsae.load_labels(loaded).labels == by_name.labels
    shutil.copytree(folder, tmp_path / "mine")
    assert jsae.load_labels(jsae.JointSAE.load_from_disk(tmp_path / "mine")).labels == by_name.labels
    (tmp_path / "mine" / "labels.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no labels.json; label the SAE first"):
        jsae.load_labels(tmp_path / "mine")
    with pytest.raises(ValueError, match="unknown release 'jsae-shapes-lava-l4'; did you mean"):
        jsae.load_labels("jsae-shapes-lava-l4")
    with pytest.raises(ValueError, match="cannot tell where this JointSAE came from"):
        jsae.load_labels(jsae.JointSAE(jsae.JointSAEConfig(d_in=4, d_sae=8)))
