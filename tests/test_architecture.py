"""The package's shape: data flows one way.

Every module of jsae belongs to one stage of the flow (world → adapters → activations → capture → SAEs and
training → labels → interventions → protocol → report / releases / VISTA → CLI); a module may import only
from its own stage or an earlier one.  The protocol's runner (``jsae.protocol.run``) is the one place that
calls every stage, the report included.  This parses every import (module-level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import jsae

ROOT = Path(jsae.__file__).resolve().parent
ADAPTERS = Path(jsae.adapters.__file__).resolve().parent

# (module prefix, stage); the longest matching prefix wins
STAGES = {
    "jsae.files": 0, "jsae.correlation": 0, "jsae.world": 0, "jsae.locks": 0, "jsae.guards": 0, "jsae.provenance": 0,
    "jsae.adapters": 1, "jsae.data": 1,
    "jsae.world.models": 2, "jsae.world.training": 2, "jsae.world.evaluate": 2, "jsae.world.processors": 2,
    "jsae.vlm": 2, "jsae.activations": 2,
    "jsae.capture": 3, "jsae.cost": 3,
    "jsae.saes": 4, "jsae.training": 4,
    "jsae.labels": 5,
    "jsae.interventions": 6,
    "jsae.protocol": 7,
    "jsae.report": 8, "jsae.releases": 8, "jsae.vista": 8, "jsae.bridge": 8,
    "jsae.releases.registry": 0,  # the release registry imports nothing of jsae: SAE loading and labels look releases up
    "jsae.cli": 9, "jsae.testing": 9,
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


def jsae_imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
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


def test_every_import_points_upstream():
    files = [p for p in ROOT.rglob("*.py") if "releases" not in p.parts or p.parent.name == "releases"]
    files += list(ADAPTERS.rglob("*.py"))
    assert len(files) > 40
    backward = []
    for path in files:
        me = module_name(path)
        for target, line in jsae_imports(path):
            if me in ("jsae.protocol.run", "jsae.protocol.experiments") or target.startswith(me + "."):
                continue  # the runners call every stage; a package may re-export its own modules
            if target == "jsae":  # the public API (the whole package): for the command line only
                if stage(me) != STAGES["jsae.cli"] and me != "jsae":
                    backward.append(f"{me}:{line} imports the package jsae")
                continue
            a, b = stage(me), stage(target)
            assert a is not None and b is not None, f"{me} or {target} has no stage: add it to STAGES"
            if b > a:
                backward.append(f"{me}:{line} imports {target}")
    assert not backward, "imports against the flow:\n" + "\n".join(backward)


def test_no_model_specific_branch_outside_adapters():
    """Model families are told apart in adapters/ only (no `"llava"` / `"qwen"` string tests elsewhere);
    ``jsae.testing`` builds one tiny model per family and is the exception."""
    hits = []
    for path in (p for p in ROOT.rglob("*.py") if p.name != "testing.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            low = line.lower()
            if ("== \"llava\"" in low or "== 'llava'" in low or "\"qwen\" in" in low or "startswith(\"qwen" in low
                    or "isinstance(" in low and "forconditionalgeneration" in low):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
