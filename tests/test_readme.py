"""The README runs as written.

Every ```python block of README.md is executed on its own (a fresh namespace, a fresh working directory, a fresh
process shared by all blocks only for import speed), offline, on the toy models: a line that names a real model
or an unpublished release carries the marker ``# toy: "<name>"``, and that line's first string literal is
replaced by the marked toy name — the one substitution made.  Every ``jsae ...`` command line of the README's
```bash blocks is parsed by the real command line (groups, commands, options and their types resolved by Click
without running anything), and the commands a newcomer runs by hand are run in ``test_pipeline_by_hand``."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from jsae.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"""#\s*toy:\s*("[^"]*")\s*$""")
STRING = re.compile(r""""[^"\n]*"|'[^'\n]*'""")


def blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def toy_substitution(code: str) -> str:
    """Replace the first string literal of every ``# toy: "name"`` line by the marked name."""
    out = []
    for line in code.splitlines():
        mark = MARK.search(line)
        if mark:
            body = line[:mark.start()]
            assert STRING.search(body), f"a '# toy:' marker on a line without a string: {line!r}"
            line = STRING.sub(lambda _: mark.group(1), body, count=1).rstrip()
        out.append(line)
    return "\n".join(out) + "\n"


def test_the_marker_substitutes_only_marked_lines() -> None:
    code = 'a = f("llava-hf/x", "y")   # toy: "llava"\nb = "llava-hf/x"\n'
    assert toy_substitution(code) == 'a = f("llava", "y")\nb = "llava-hf/x"\n'


RUNNER = r"""
import json, os, runpy, sys, traceback
blocks = json.load(open(sys.argv[1]))
results = []
for i, (line, code) in enumerate(blocks):
    d = os.path.join(sys.argv[2], f"block-{i}")
    os.makedirs(d)
    os.chdir(d)
    path = os.path.join(d, f"README_line_{line}.py")  # a file: nnsight reads a trace's body back from its source
    with open(path, "w") as f:
        f.write(code)
    try:
        runpy.run_path(path, run_name="__main__")
        results.append([line, None])
    except BaseException:
        results.append([line, traceback.format_exc(limit=4)])
json.dump(results, open(sys.argv[3], "w"))
"""


@pytest.mark.slow
def test_every_python_snippet_runs_as_written(tmp_path: Path) -> None:
    py = [(line, toy_substitution(code)) for line, code in blocks("python")]
    assert len(py) >= 6, "the README lost its snippets"
    (tmp_path / "blocks.json").write_text(json.dumps(py))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json"), str(tmp_path),
                          str(tmp_path / "results.json")], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = [f"README.md:{line}\n{err}" for line, err in json.loads((tmp_path / "results.json").read_text()) if err]
    assert not failed, "\n\n".join(failed)


# typer >= 0.2x vendors its own click (typer._click); older ones use click itself
CLICK_ERRORS = tuple({click.ClickException, getattr(getattr(typer, "_click", click), "ClickException", click.ClickException)})


def parse_command(args: list[str]) -> object:
    """Resolve ``jsae ARGS`` down to its command and parse its options, as the console script would, without
    running anything (a bad group, command, option or value raises a Click error)."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("jsae", list(args), resilient_parsing=False)
    while hasattr(cmd, "resolve_command"):  # a group: on to the named command
        rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        assert cmd is not None, f"jsae {' '.join(args)}: no command {name!r}"
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def readme_commands() -> list[tuple[int, list[str]]]:
    out = []
    for line, code in blocks("bash"):
        for i, text in enumerate(code.replace("\\\n", " ").splitlines()):
            text = text.split(" #")[0].strip()
            for part in re.split(r"\s*&&\s*", text):
                words = shlex.split(part)
                if words and Path(words[0]).name == "jsae":
                    out.append((line + i + 1, words[1:]))
    return out


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_internal_link_has_its_heading() -> None:
    text = README.read_text()
    outside = FENCE.sub("", text)
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", outside, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", outside)
    assert len(links) >= 10 and "the-protocol-jsae-demo-jsae-sweep" in anchors
    assert not [a for a in links if a not in anchors], [a for a in links if a not in anchors]


def test_the_readme_opens_with_findings_contents_and_a_quick_start() -> None:
    text = README.read_text()
    heads = re.findall(r"^## (.*)$", FENCE.sub("", text), re.M)
    assert heads[:3] == ["Contents", "Quick start", "Concepts"], heads
    assert text.index("**What it found**") < text.index("## Contents")
    assert "source .venv/bin/activate" in text and "bash .ci/browser" in text
    for term in ("r50", "Holm", "n.r.", "censored", "oracle"):  # defined in Concepts before Results uses them
        assert text.index(term, text.index("## Concepts")) < text.index("## Results"), term
    for author_speak in ("issue 13", "issue 19", "this 2-core", "this session", "budget's defaults"):
        assert author_speak not in text, author_speak


def test_every_readme_command_parses() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 10, cmds
    bad = []
    for line, args in cmds:
        try:
            parse_command(args)
        except (*CLICK_ERRORS, AssertionError) as exc:
            bad.append(f"README.md:{line}: jsae {' '.join(args)}: {exc}")
    assert not bad, "\n".join(bad)
    with pytest.raises(CLICK_ERRORS):  # the check can fail
        parse_command(["sae", "steer", "--no-such-option"])


@pytest.mark.slow
def test_pipeline_by_hand(tmp_path: Path) -> None:
    """capture → train → label → steer → features → release push → pull → load, through the installed console
    script (its real entry point, in fresh processes), on the toy LLaVA, as the README's "By hand" section does."""
    jsae_bin = Path(sys.executable).with_name("jsae")
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{jsae_bin.parent}:/usr/bin:/bin",
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}

    def jsae(*args: str) -> str:
        res = subprocess.run([str(jsae_bin), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert res.returncode == 0, f"jsae {' '.join(args)}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        return res.stdout

    by_hand = next(code for _, code in blocks("bash") if "jsae sae label" in code and "jsae run capture" in code)
    outputs = {}
    for line in by_hand.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("jsae "):
            words = shlex.split(line)[1:]
            outputs[" ".join(words[:2])] = jsae(*words)
    assert [*outputs] == ["run capture", "sae train", "sae label", "sae steer", "look features", "release push"]
    labels = json.loads((tmp_path / "my_sae" / "labels.json").read_text())
    assert labels["data"]["kind"] == "world" and sum(lab["label"] is not None for lab in labels["labels"]) > 0
    assert (tmp_path / "my_sae" / "features.html").stat().st_size > 10_000
    out = outputs["sae steer"]
    assert sum(line.startswith("+ ") for line in out.splitlines()) == 4 and "'cat' mentioned:" in out, out
    assert "preservation:" in out and "mean image-token state norm" in out, out  # strength in the report's units
    assert re.search(r"FVU vision [0-9.]+ / text [0-9.]+, L0 vision [0-9.]+ / text [0-9.]+, dead latents", outputs["sae train"])
    assert re.search(r"labelled \d+ of 256 features .*; \d+ unlabelled: \d+ never active", outputs["sae label"])
    card_metrics = json.loads((tmp_path / "my_sae" / "metrics.json").read_text())
    assert card_metrics["alignment"] == "cosine" and 0 < card_metrics["l0"] and card_metrics["measured_on"] == "training pairs"
    weights = tmp_path / "my_sae" / "sae_weights.safetensors"
    assert weights.stat().st_mode & 0o044 == 0o044, "weights must be readable by group and others (umask 022)"
    repo = tmp_path / "hub" / "me" / "my-jsae"
    assert (repo / "README.md").is_file() and any(repo.rglob("sae_weights.safetensors"))
    row = next(line for line in (repo / "README.md").read_text().splitlines() if line.startswith("| `"))
    assert "–" not in row and "| cosine |" in row, row  # the model card carries the SAE's metrics
    out = jsae("release", "pull", "me/my-jsae", "--hub", str(tmp_path / "hub"), "--out", str(tmp_path / "pulled"))
    pulled = next((tmp_path / "pulled").rglob("cfg.json")).parent
    load = (f"import jsae, torch; from sae_lens import SAE; a = SAE.load_from_disk({str(pulled)!r}); "
            f"b = SAE.load_from_disk({str(tmp_path / 'my_sae')!r}); x = torch.randn(3, a.cfg.d_in); "
            "assert all(torch.equal(a.encode(x, m), b.encode(x, m)) for m in ('vision', 'text')); print('same')")
    res = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "same" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([str(jsae_bin), "look", "features", "my_sae/layer_4"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 2 and "no such directory" in res.stderr + res.stdout
