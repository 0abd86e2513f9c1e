"""The package's shape, checked on the parsed source (module-level and in-function code alike).

1. **Data flows one way.**  Every module of jsae belongs to one stage of the flow (:data:`STAGES`); a module may
   import only from its own stage or an earlier one.  There is no exemption: the protocol's runner writes its
   report with the renderers of ``jsae.report``, which need nothing of the protocol, so the report comes first.
2. **Model families are told apart in ``adapters/`` only.**  Outside it no comparison (``==``, ``in``, ``is``,
   ``startswith``...) with a model family's name or any model class name (``type(m).__name__ == "CLIPModel"``),
   no ``isinstance`` against a family's class, and no ``hasattr`` / ``getattr`` probe of a family's structure
   (``depth``, ``image_grid_pinpoints``...): ask the adapter.
3. **No private names across modules.**  No ``from module import _name`` of jsae or of a library, and no
   ``obj._name`` (or ``getattr(obj, "_name")``) of a name the module does not define itself, except the documented
   integrations in :data:`PRIVATE_INTEGRATIONS` where the library has no public route.

Each rule is also run on small bad and good sources, so a checker that finds nothing cannot pass."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import jsae

ROOT = Path(jsae.__file__).resolve().parent
ADAPTERS = Path(jsae.adapters.__file__).resolve().parent

# (module prefix, stage); the longest matching prefix wins
STAGES = {
    # 0: no model: files, guards, helpers over transformers objects, the world's data, data sources and judges
    "jsae.files": 0, "jsae.parallel": 0, "jsae.correlation": 0, "jsae.locks": 0, "jsae.guards": 0, "jsae.provenance": 0, "jsae.hf": 0,
    "jsae.world": 0, "jsae.data": 0,
    "jsae.releases.registry": 0,  # the release registry imports nothing of jsae: SAE loading and labels look releases up
    # 1: everything model-specific
    "jsae.adapters": 1,
    # 2: models: the one loader, the one reader of hidden states, and the world's toy VLMs (built, trained, judged)
    "jsae.world.models": 2, "jsae.world.training": 2, "jsae.world.evaluate": 2, "jsae.world.processors": 2,
    "jsae.world.dino": 2,
    "jsae.vlm": 2, "jsae.activations": 2,
    "jsae.capture": 3, "jsae.cost": 3,
    "jsae.saes": 4, "jsae.training": 4,
    "jsae.labels": 5,
    "jsae.interventions": 6,
    "jsae.report": 7,  # renderers (markdown, plots, browser) and the run directory's layout
    "jsae.protocol": 8,  # the stages, which write their report with jsae.report
    "jsae.releases": 9, "jsae.vista": 9, "jsae.bridge": 9,
    "jsae.cli": 10, "jsae.testing": 10,
}


def stage(module: str) -> int | None:
    best = max((p for p in STAGES if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else STAGES[best]


def module_name(path: Path) -> str:
    if path.is_relative_to(ADAPTERS):
        parts = ["jsae", "adapters", *path.relative_to(ADAPTERS).with_suffix("").parts]
    else:
        parts = ["jsae", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    files = [p for p in ROOT.rglob("*.py") if "releases" not in p.parts or p.parent.name == "releases"]
    files += list(ADAPTERS.rglob("*.py"))
    assert len(files) > 40
    return files


def jsae_imports(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "jsae" else [
                f"jsae.{a.name}" if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file() or a.name == "adapters"
                else "jsae" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, node.lineno) for n in names if n == "jsae" or n.startswith("jsae.")]
    return out


def backward_imports(me: str, tree: ast.AST) -> list[str]:
    out = []
    for target, line in jsae_imports(tree):
        if target.startswith(me + "."):
            continue  # a package may re-export its own modules
        if target == "jsae":  # the public API (the whole package): for the command line only
            if stage(me) != STAGES["jsae.cli"] and me != "jsae":
                out.append(f"{me}:{line} imports the package jsae")
            continue
        a, b = stage(me), stage(target)
        assert a is not None and b is not None, f"{me} or {target} has no stage: add it to STAGES"
        if b > a:
            out.append(f"{me}:{line} imports {target}")
    return out


# ---- model families ---------------------------------------------------------------------------------------------
FAMILIES = ("llava", "qwen", "mistral", "gemma", "llama", "clip", "siglip", "dinov2", "idefics", "paligemma", "pixtral",
            "internvl", "smolvlm", "phi3v", "molmo", "chameleon", "blip", "fuyu", "kosmos", "aria")
#: a family's name as a whole string or its start ("llava", "qwen3_vl", "Qwen/Qwen3-VL-4B"), a family's class name,
#: or any transformers model class name ("MyVLMForConditionalGeneration", "CLIPModel")
FAMILY_STRING = re.compile(rf"(?i:^(?:[\w.-]+/)?(?:{'|'.join(FAMILIES)})(?![a-z]))|(?i:ForConditionalGeneration)|"
                           rf"(?i:^(?:{'|'.join(FAMILIES)})\w*(?:Model|Config|Processor|ImageProcessor\w*)$)|"
                           r"^[A-Z]\w*(?:ForCausalLM|VisionModel|Model)$")
#: a family's class (for isinstance): its name starts with a family's, or it is a ForConditionalGeneration
FAMILY_CLASS = re.compile(rf"(?i:^(?:{'|'.join(FAMILIES)}))|ForConditionalGeneration")
#: config / module attributes that exist in some families only: probing them is telling the families apart
FAMILY_ATTRIBUTES = {"depth", "image_grid_pinpoints", "deepstack_visual_indexes", "spatial_merge_size",
                     "temporal_patch_size", "visual", "vision_tower", "multi_modal_projector", "merger",
                     "deepstack_merger_list", "vision_feature_layer", "vision_feature_select_strategy", "image_token_index",
                     "vision_start_token_id", "mrope_section", "image_newline"}
STRING_TESTS = {"startswith", "endswith", "match", "fullmatch", "search", "find", "index", "count"}


def _family_constant(node: ast.AST) -> str | None:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and FAMILY_STRING.search(sub.value):
            return sub.value
    return None


def family_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` of every comparison, string test, ``isinstance`` or attribute probe that tells model
    families apart."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(_family_constant(p) for p in parts):
                hits.append((node.lineno, f"compares with the family {next(filter(None, map(_family_constant, parts)))!r}"))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in STRING_TESTS and any(_family_constant(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                hits.append((node.lineno, f"tests a string for a family ({name})"))
            elif name == "isinstance" and len(node.args) == 2:
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                named = [ast.unparse(c).rsplit(".", 1)[-1] for c in classes]
                if any(FAMILY_CLASS.search(n) for n in named):
                    hits.append((node.lineno, f"isinstance against a family's class {named}"))
            elif name in ("hasattr", "getattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in FAMILY_ATTRIBUTES:
                hits.append((node.lineno, f"probes the family attribute {node.args[1].value!r} ({name})"))
    return hits


# ---- private names -------------------------------------------------------------------------------------------------
#: (module, private name used) -> why there is no public route; each is that integration's one home
PRIVATE_INTEGRATIONS = {
    ("jsae.hf", "_module"): "nnsight's Envoy keeps the wrapped torch module in _module and has no public accessor",
    ("jsae.bridge", "_adapters"): "TransformerLens's ArchitectureAdapterFactory has no public getter of a registration",
    ("jsae.cost", "_no_split_modules"): "transformers declares the blocks accelerate must not split only in this class "
                                        "attribute (what device_map='auto' itself reads); there is no public accessor",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_here(tree: ast.AST) -> set[str]:
    """Names the module itself defines: functions, classes, assigned attributes and variables, parameters."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            out.add(str(node.args[1].value))
    return out


def private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, name)`` of every private name imported from another module or read off another module's object."""
    mine = _defined_here(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            hits += [(node.lineno, a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in mine \
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "ctx")):
            hits.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value) and node.args[1].value not in mine:
            hits.append((node.lineno, node.args[1].value))
    return hits


# ---- the rules on the package ----------------------------------------------------------------------------------


def test_every_import_points_upstream_with_no_exemption():
    backward = []
    for path in source_files():
        backward += backward_imports(module_name(path), ast.parse(path.read_text()))
    assert not backward, "imports against the flow:\n" + "\n".join(backward)


def test_no_model_family_branch_outside_adapters():
    hits = []
    for path in source_files():
        if path.is_relative_to(ADAPTERS):
            continue
        hits += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in family_branches(ast.parse(path.read_text()))]
    assert not hits, "ask the adapter instead:\n" + "\n".join(hits)


def test_no_private_name_across_modules():
    hits = []
    for path in source_files():
        me = module_name(path)
        for line, name in private_uses(ast.parse(path.read_text())):
            if (me, name) not in PRIVATE_INTEGRATIONS and (me, "*") not in PRIVATE_INTEGRATIONS:
                hits.append(f"{me}:{line}: {name}")
    assert not hits, "private names used across modules:\n" + "\n".join(hits)


def test_every_private_integration_is_still_needed():
    """An integration listed in PRIVATE_INTEGRATIONS that the code no longer uses must leave the list."""
    used = {(module_name(p), n) for p in source_files() for _, n in private_uses(ast.parse(p.read_text()))}
    modules = {m for m, _ in used}
    stale = [k for k in PRIVATE_INTEGRATIONS if (k not in used if k[1] != "*" else k[0] not in modules)]
    assert not stale, f"no longer used, remove from PRIVATE_INTEGRATIONS: {stale}"


# ---- the checkers themselves find what they are for -----------------------------------------------------------------
BAD_FAMILY = {
    'if arch == "LlavaForConditionalGeneration": pass': "compares with the family",
    'if name != "llava": pass': "compares with the family",
    'ok = "qwen" in model_type': "compares with the family",
    'ok = arch in ("Qwen3VLForConditionalGeneration", "X")': "compares with the family",
    'ok = name.startswith("qwen")': "tests a string for a family",
    'ok = type(m).__name__ in ("CLIPModel", "SiglipModel")': "compares with the family",
    'ok = m.__class__.__name__ == "MyVLMForConditionalGeneration"': "compares with the family",
    'ok = isinstance(m, transformers.LlavaForConditionalGeneration)': "isinstance against a family's class",
    'ok = isinstance(cfg, (Qwen3VLConfig, int))': "isinstance against a family's class",
    'ok = hasattr(v, "depth")': "probes the family attribute",
    'n = getattr(cfg, "image_grid_pinpoints", None)': "probes the family attribute",
}
GOOD_FAMILY = ['if name != "grad_clip_norm": pass', 'ok = type(e).__name__ == "SafetensorError"', 'ok = name in TOY_MODELS', 'x = {"llava": 1}["llava"]',
               'ok = hasattr(m, "lm_head")', 'ok = isinstance(x, torch.Tensor)', 'ok = isinstance(m, PreTrainedModel)', 'ok = s.startswith("blocks.")']


@pytest.mark.parametrize("src", sorted(BAD_FAMILY))
def test_the_family_checker_finds_each_kind_of_branch(src):
    hits = family_branches(ast.parse(src))
    assert len(hits) == 1 and BAD_FAMILY[src] in hits[0][1], hits


def test_the_family_checker_passes_neutral_code():
    assert [family_branches(ast.parse(s)) for s in GOOD_FAMILY] == [[]] * len(GOOD_FAMILY)


def test_the_import_checker_finds_an_import_against_the_flow():
    assert backward_imports("jsae.protocol.run", ast.parse("from jsae.cli import main")) == ["jsae.protocol.run:1 imports jsae.cli"]
    assert backward_imports("jsae.data.judges", ast.parse("def f():\n    from jsae.adapters import unwrap")) == \
        ["jsae.data.judges:2 imports jsae.adapters"]
    assert backward_imports("jsae.protocol.run", ast.parse("from jsae.report import write_run_report")) == []


def test_the_private_checker_finds_private_names_of_other_modules():
    src = ("from jsae.capture import _model_name\nfrom sae_lens.saes.sae import _disable_hooks\n"
           "def f(adapter, m):\n    return adapter._ids(m), getattr(m, '_name_or_path', '')\n")
    assert sorted(n for _, n in private_uses(ast.parse(src))) == ["_disable_hooks", "_ids", "_model_name", "_name_or_path"]
    own = "class A:\n    def _x(self):\n        return self._y\ndef g(a):\n    return a._x(), a.__class__\n"
    assert private_uses(ast.parse(own)) == []
