"""What every command group shares: the one error helper and the parsing of list options.

Only typer and the standard library are imported at module level (see :mod:`jsae.cli`)."""

from __future__ import annotations

from typing import Any, NoReturn

import typer


def fail(msg: str) -> NoReturn:
    """Print ``error: <msg>`` on stderr and exit with code 2 (bad input, as typer's own usage errors)."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


DEBUG = False  # set by `jsae --debug` (or JSAE_DEBUG=1): show tracebacks instead of one-line errors
_CLICK_FLOW = ("Exit", "Abort", "ClickException", "UsageError", "BadParameter")


def set_debug(on: bool) -> None:
    global DEBUG
    DEBUG = bool(on)


def debugging() -> bool:
    import os

    return DEBUG or os.environ.get("JSAE_DEBUG", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def guard_command(fn: Any) -> Any:
    """``fn`` (a command) with every exception it lets escape turned into one line on stderr: ``error: <msg>``
    (exit 2) for the errors jsae raises on bad input, ``error: <Type>: <msg>`` (exit 1) for anything else;
    ``jsae --debug`` shows the traceback instead."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted; re-run the same command to resume where it can", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the command line's last line of defence
            if any(c.__name__ in _CLICK_FLOW for c in type(exc).__mro__) or debugging():
                raise
            known = (ValueError, TypeError, OSError, RuntimeError, MemoryError, NotImplementedError, ImportError)
            if isinstance(exc, known):
                fail(one_line(exc) + (" (--debug shows the traceback)" if "\n" in str(exc).strip() else ""))
            typer.echo(f"error: {type(exc).__name__}: {one_line(exc)} (an unexpected failure; --debug shows the traceback)",
                       err=True)
            raise typer.Exit(1) from None

    return wrapper


def guard_app(app: Any) -> None:
    """Wrap every command of ``app`` and of its sub-groups with :func:`guard_command` (once)."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_jsae_guarded", False):
            info.callback = guard_command(info.callback)
            info.callback._jsae_guarded = True
    for group in app.registered_groups:
        guard_app(group.typer_instance)


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


__all__ = ["data_source", "debugging", "fail", "float_list", "guard_app", "guard_command", "int_list", "model_options",
           "one_line", "set_debug"]
