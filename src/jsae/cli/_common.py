"""What every command group shares: the one error helper and the parsing of list options.

Only typer and the standard library are imported at module level (see :mod:`jsae.cli`)."""

from __future__ import annotations

from typing import Any, NoReturn

import typer


def fail(msg: str) -> NoReturn:
    """Print ``error: <msg>`` on stderr and exit with code 2 (bad input, as typer's own usage errors)."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def int_list(spec: str, flag: str) -> list[int]:
    """``"2,4,6"`` -> ``[2, 4, 6]``; a one-line error naming ``flag`` otherwise (empty items are skipped)."""
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} must be comma-separated integers like 2,4,6, got {spec!r}")


def float_list(spec: str, flag: str) -> list[float]:
    """``"0.2,0.4"`` -> ``[0.2, 0.4]``; a one-line error naming ``flag`` otherwise."""
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} must be comma-separated numbers like 0.2,0.4,0.6, got {spec!r}")


def data_source(data: str | None, split: str, n: int, seed: int) -> tuple[Any, str]:
    """``(source, part)`` of the CLI's data options: the world split ``--split`` (``--n`` pairs, ``--seed``),
    or every row of split ``--split`` of the caption dataset ``--data`` (path or hub id)."""
    from jsae.data.sources import CaptionSource, WorldSource

    if data:
        return CaptionSource.whole(data, split), split
    return WorldSource.split(split, n, seed), split


def model_options() -> dict[str, Any]:
    """The options of every command that loads a VLM (``--dtype``, ``--device``, ``--device-map``)."""
    return {
        "dtype": typer.Option("auto", help="weights dtype: auto (the checkpoint's; toy models: float32) | float32 | bfloat16 | float16"),
        "device": typer.Option(None, help="device to run the VLM on, e.g. cuda (default: cpu)"),
        "device_map": typer.Option(None, help="transformers device_map for a model larger than one device, e.g. auto"),
    }


__all__ = ["data_source", "fail", "float_list", "int_list", "model_options"]
