"""Every numeric option of every command is range-checked when the command line is parsed, before anything is
loaded or written (issue 32): a table gives, for each (command, option), what a negative value, zero and a huge
one (10**12, or 1e30 for a float) must do, and the test fails for an option the table does not know.  A value
whose memory cannot fit (a count of world pairs) is refused with the estimate.  Usage errors of every kind are
one line (``error: ...``, exit 2), like every other error of the command line."""

from __future__ import annotations

import typing
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from jsae.cli import app

runner = CliRunner()
ROOT = typer.main.get_command(app)

# E: refused (one line naming the option) · V: accepted · M: refused with a memory estimate
# letters: (negative, zero, huge)
TABLE: dict[str, dict[str, str]] = {
    "demo": {"--steps": "EEE", "--epochs": "EEE", "--d-sae": "EEE", "--n-train": "EEM", "--n-label": "EEM",
             "--n-eval": "EEM", "--n-images": "EEV", "--top-k": "EEV", "--max-concepts": "EEV", "--min-count": "EEV",
             "--max-perplexity": "EEV", "--max-new-tokens": "EEE", "--seed": "EVE", "--expansion-factor": "EEE"},
    "run sweep": {"--steps": "EEE", "--n-images": "EEV", "--d-sae": "EEE", "--expansion-factor": "EEE",
                  "--max-concepts": "EEV", "--n-train": "EEM", "--n-label": "EEM"},
    "run capture": {"--n": "EEM", "--batch-size": "EEV", "--seed": "EVE", "--n-pairs": "EEV", "--shard-size": "EEE"},
    "run experiments": {"--max-new-tokens": "EEE", "--batch-size": "EEV"},
    "sae train": {"--layer": "EVE", "--k": "EEV", "--d-sae": "EEE", "--steps": "EEE", "--epochs": "EEE",
                  "--batch-size": "EEV", "--lr": "EEE", "--l1-coefficient": "EVE", "--seed": "EVE"},
    "sae label": {"--layer": "EVE", "--n": "EEM", "--seed": "EVE", "--min-corr": "EEE"},
    "sae steer": {"--layer": "EVE", "--alpha": "VVE", "--n": "EEV", "--max-new-tokens": "EEE", "--n-features": "EVV",
                  "--seed": "EVE"},
    "look features": {"--n-features": "EEV", "--n-pairs": "EEM"},
    "look export-neuronpedia": {"--n-features": "EEV", "--n-examples": "EEV", "--n-pairs": "EEM"},
    "look core-metrics": {"--n-captions": "EEM"},
    "release build-shipped": {"--steps": "EEE", "--d-sae": "EEE"},
    "world sample": {"--n": "EEM", "--seed": "EVE", "--scale": "EEE"},
    "world dataset": {"--n-train": "EEM", "--n-validation": "EEM", "--n-test": "EEM", "--seed": "EVE"},
    "world train-models": {"--seed": "EVE", "--threads": "EEE", "--workers": "EVE", "--text-steps": "EVE",
                           "--vision-steps": "EVE", "--align-steps": "EVE", "--finetune-steps": "EVE",
                           "--batch-size": "EEE", "--eval-n": "EVM"},
    "world evaluate": {"--n": "EEM"},
    "world fidelity": {"--n-images": "EEM", "--n-steer": "EEE", "--n-captions": "EVM", "--threads": "EEE"},
    "vista train": {"--edit-layer": "EVE", "--lam": "EVE", "--steps": "EEE", "--batch-size": "EEV", "--lr": "EEE",
                    "--n-train": "EEM", "--sae-steps": "EEE", "--d-sae": "EEE", "--seed": "EVE"},
    "vista toy-parts": {"--seed": "EVE", "--threads": "EEE"},
    "vista eval": {"--n-eval": "EEM", "--k": "EEV", "--edit-layer": "EVE", "--seed": "EVE"},
    "": {"--threads": "EEE"},  # the global option of `jsae`
}
TABLE["run demo"] = TABLE["demo"]  # the same command under its group


def _commands(group=ROOT, path=()):
    yield " ".join(path), group
    for name, cmd in getattr(group, "commands", {}).items():
        if cmd.hidden:
            continue  # the flat names of earlier versions are the same commands
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def _kind(p: typing.Any) -> typing.Any:
    """int / float for a numeric parameter, else str: typer's type descriptor (typer >= 0.2x), else click's type."""
    desc = getattr(p, "type_descriptor", None)
    if desc is not None:
        args = [a for a in typing.get_args(desc.annotation) if a is not type(None)]
        return args[0] if args else desc.annotation
    if isinstance(p.type, click.types.IntParamType):
        return int
    return float if isinstance(p.type, click.types.FloatParamType) else str


def _numeric(cmd) -> dict[str, type]:
    out = {}
    for p in cmd.params:
        t = _kind(p)
        if t in (int, float) and p.opts:
            out[p.opts[0]] = t
    return out


COMMANDS = {path: cmd for path, cmd in _commands() if _numeric(cmd) or path in TABLE}


def test_the_table_covers_every_numeric_option_of_every_command():
    found = {path: set(_numeric(cmd)) for path, cmd in COMMANDS.items() if _numeric(cmd)}
    assert found == {path: set(opts) for path, opts in TABLE.items()}, (
        "a command's numeric options changed: add each to TABLE with what -1, 0 and a huge value must do")


def _required(cmd, skip: str) -> list[str]:
    """Placeholder values for the command's other required options (parsing only: nothing runs)."""
    args = []
    for p in cmd.params:
        if p.required and p.opts and p.opts[0] != skip:
            t = _kind(p)
            value = "1" if t in (int, float) else "x"
            args += [p.opts[0], value] if p.opts[0].startswith("-") else [value]
    return args


CASES = [(path, opt, i, code) for path, opts in TABLE.items() for opt, codes in opts.items() for i, code in enumerate(codes)]


@pytest.mark.parametrize("path,opt,which,code", CASES, ids=[f"{c[0] or 'jsae'} {c[1]} {('neg', 'zero', 'huge')[c[2]]}"
                                                            for c in CASES])
def test_option_ranges_when_parsing(path, opt, which, code):
    from jsae.cli._common import click_exceptions

    BadParameter = click_exceptions().BadParameter  # noqa: N806

    cmd = COMMANDS[path]
    kind = _numeric(cmd)[opt]
    value = (-1, 0, 10**12)[which] if kind is int else (-1.0, 0.0, 1e30)[which]
    args = [opt, str(value)] + _required(cmd, opt)
    if path == "":  # the group's own option, through the command line (it parses it, then stops at the help)
        r = runner.invoke(app, [*args, "demo", "--help"], prog_name="jsae")
        assert (r.exit_code == 0) if code == "V" else (r.exit_code == 2 and f"'{opt}'" in r.output), r.output
        return
    if code == "V":
        try:
            cmd.make_context(path or "jsae", args, resilient_parsing=False)
        except typer.Exit:
            pass
        return
    with pytest.raises(BadParameter) as exc:
        cmd.make_context(path or "jsae", args)
    msg = exc.value.format_message()
    assert opt in msg and "\n" not in msg.strip(), msg
    if code == "M":
        assert "of memory" in msg and "this machine has" in msg, msg


def _one_line(args: list[str]) -> str:
    r = runner.invoke(app, args, prog_name="jsae")
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize("path", [p for p in TABLE if p])
def test_every_command_answers_an_out_of_range_option_with_one_line(path, tmp_path, monkeypatch):
    """Through the real command line: one line naming the option and the command's help, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    cmd = COMMANDS[path]
    opt = next(iter(TABLE[path]))
    args = [*path.split(), opt, "-1", *_required(cmd, opt)]
    msg = _one_line(args)
    assert f"'{opt}'" in msg and f"jsae {path} --help" in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_other_usage_errors_are_one_line_too():
    assert "Missing option '--concept'" in _one_line(["sae", "steer", "--sae", "x"])
    assert "No such command 'bogus'" in _one_line(["sae", "bogus"])
    assert "No such option" in _one_line(["run", "capture", "--layerz", "2"])
    assert "'--n'" in _one_line(["sae", "steer", "--sae", "x", "--concept", "dog", "--layer", "2", "--alpha", "1",
                                 "--n", "many"])


def test_issue_cases_steer_n_and_capture_n():
    """`sae steer --n -2` ran and `--n 0` blamed the data; `run capture --n 1000000000000` grew memory for minutes."""
    steer = ["sae", "steer", "--sae", "x", "--concept", "dog", "--layer", "2", "--alpha", "1"]
    assert "'--n': must be at least 1, got -2" in _one_line([*steer, "--n", "-2"])
    assert "'--n': must be at least 1, got 0" in _one_line([*steer, "--n", "0"])
    msg = _one_line(["run", "capture", "--layers", "2", "--n", "1000000000000", "--out", "x"])
    assert "1000000000000 world pairs need about" in msg and "PB of memory" in msg


def test_a_capture_that_cannot_fit_on_its_disk_is_refused_with_the_estimate(tmp_path):
    from jsae.capture import check_capture_disk

    need = check_capture_disk(tmp_path / "c", 1000, 2, 128)
    assert need == 1000 * 2 * 2 * 128 * 4
    with pytest.raises(OSError, match=r"capturing 1000000000000 pairs at 4 layer\(s\) of width 4096 needs about .* on "
                                      r"disk but .* free") as exc:
        check_capture_disk(tmp_path / "c", 10**12, 4, 4096)
    assert exc.value.errno == 28 and not (tmp_path / "c").exists()


def test_python_boundaries_refuse_a_world_too_large_for_memory():
    from jsae.data.sources import WorldSource
    from jsae.protocol.config import ProtocolConfig, check_config

    with pytest.raises(MemoryError, match="n = 1000000000000 world pairs need about"):
        WorldSource.split("train", 10**12)
    with pytest.raises(MemoryError, match="n_train \\+ n_label \\+ n_eval = "):
        check_config(ProtocolConfig(n_train=10**12))
