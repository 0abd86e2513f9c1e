"""`--help` tells the truth: every default it states is the value the command uses (checked against the
configuration each command builds), boolean options render as flags (``--x / --no-x``, never ``<bool>``); and
the commands say what they did (``sae label``'s account of unlabelled features)."""

from __future__ import annotations

import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from jsae.cli import app

runner = CliRunner()
ROOT = typer.main.get_command(app)
DEFAULT = re.compile(r"\(default:? ([0-9][0-9.,e-]*)[;)]")


def _commands(group=ROOT, path=()):
    for name, cmd in getattr(group, "commands", {}).items():
        if getattr(cmd, "hidden", False):
            continue
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


COMMANDS = dict(_commands())


def _stated(cmd) -> dict[str, str]:
    """option name -> the default its help states in words, ``(default N`` (for options whose Click default is
    None, the value is filled in by the command)."""
    out = {}
    for p in cmd.params:
        m = DEFAULT.search(getattr(p, "help", None) or "")
        if m and not (p.help or "").startswith("--preset reference"):
            out[p.name] = m.group(1).rstrip(",.")
    return out


def _click_defaults(cmd) -> dict[str, object]:
    return {p.name: p.default for p in cmd.params}


def _num(text: str) -> object:
    if "," in text:
        return tuple(float(x) for x in text.split(","))
    return float(text) if any(c in text for c in ".e") else int(text)


def test_a_default_stated_in_words_never_contradicts_the_option_default():
    """An option with a Click default that also states one in its help must state the same value."""
    bad = []
    for path, cmd in COMMANDS.items():
        for p in cmd.params:
            m = DEFAULT.search(getattr(p, "help", None) or "")
            if m and p.default is not None and not isinstance(p.default, bool):
                if _num(m.group(1).rstrip(",.")) != p.default:
                    bad.append(f"jsae {path} --{p.name}: help says {m.group(1)}, the option's default is {p.default}")
    assert not bad, "\n".join(bad)


def test_demo_help_defaults_are_the_config_it_runs():
    from jsae.cli.run import demo_config
    from jsae.protocol.config import ProtocolConfig

    cmd = COMMANDS["demo"]
    defaults = {k: v for k, v in _click_defaults(cmd).items() if k not in ("out", "overwrite", "help")}
    cfg = demo_config(**defaults)
    assert isinstance(cfg, ProtocolConfig)
    stated = _stated(cmd)
    assert {"steps", "d_sae", "max_new_tokens", "ratios"} <= set(stated), stated  # the options whose default is filled in
    for name, text in stated.items():
        assert getattr(cfg, name) == _num(text), f"jsae demo --help says --{name} defaults to {text}; it runs {getattr(cfg, name)}"
    for name, value in defaults.items():  # and every plain default reaches the config unchanged
        if isinstance(value, (int, float)) and hasattr(cfg, name):
            assert getattr(cfg, name) == value, name
    # under --preset reference, the values the help names for it
    ref = demo_config(**{**defaults, "preset": "reference"})
    helps = {p.name: p.help for p in cmd.params}
    assert "default 600" in helps["steps"] and ref.steps == 600
    assert "reference: 50" in helps["max_new_tokens"] and ref.max_new_tokens == 50
    assert "(default 20)" in helps["epochs"] and ref.epochs == 20


def test_sae_train_help_defaults_are_the_configs_it_trains_with():
    from jsae.cli.sae import train_configs

    cmd = COMMANDS["sae train"]
    stated = _stated(cmd)
    assert {"d_sae", "steps", "lr", "batch_size"} <= set(stated), stated
    d = _click_defaults(cmd)
    cfg, tcfg = train_configs(16, preset=d["preset"], alignment=d["alignment"], activation=d["activation"], k=d["k"],
                              d_sae=d["d_sae"], steps=d["steps"], epochs=d["epochs"], lr=d["lr"],
                              l1_coefficient=d["l1_coefficient"], checkpoint_dir=None, seed=d["seed"])
    assert cfg.d_sae == _num(stated["d_sae"]) and tcfg.total_steps == _num(stated["steps"])
    assert tcfg.lr == pytest.approx(_num(stated["lr"])) and cfg.l1_coefficient == d["l1_coefficient"]
    assert cfg.alignment == d["alignment"] and cfg.activation == d["activation"]


def test_sae_steer_help_default_caption_length_is_the_one_used():
    from jsae.protocol.config import PRESET_CHOICES

    stated = _stated(COMMANDS["sae steer"])
    assert _num(stated["max_new_tokens"]) == PRESET_CHOICES["default"]["max_new_tokens"]


@pytest.mark.parametrize("path", ["", "demo", "sae steer", "run capture", "sae train"])
def test_flags_render_as_flags(path):
    res = runner.invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output, res.output
    if path == "demo":
        assert re.search(r"--revival\s+--no-revival", res.output) and "[default: revival]" in res.output
    if path == "run capture":
        assert re.search(r"--bucket\s+--no-bucket", res.output)


def test_no_command_shows_a_bool_type():
    bad = []
    for path in COMMANDS:
        res = runner.invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"})
        if res.exit_code != 0 or "<bool>" in res.output:
            bad.append(path)
    assert not bad, bad


def test_label_summary_says_why_features_are_unlabelled():
    from jsae.cli.sae import label_summary
    from jsae.labels import label_features

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, 2, generator=g) > 0.5).float()
    z = torch.zeros(200, 4)
    z[:, 0] = y[:, 0] * 3  # fires exactly on concept a: labelled, shared
    z[:, 1] = torch.rand(200, generator=g)  # fires on everything, correlates with nothing
    # feature 2 never fires; feature 3 fires on concept b in the image code only
    zt = z.clone()
    z[:, 3] = y[:, 1] * 2
    labels = label_features(z, zt, y, ["a", "b"])
    alive = (z > 0).any(0) | (zt > 0).any(0)
    line = label_summary(labels, alive, 0.3)
    assert line.startswith("labelled 2 of 4 features (1 shared, 1 vision-only, 0 text-only); 2 unlabelled: "
                           "1 never active on these pairs, 1 active but no concept correlates"), line
