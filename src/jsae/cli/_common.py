"""What every command group shares: the one error helper, one-line usage errors (:class:`OneLineGroup`), the
range checks of numeric options (:func:`number`, :func:`world_pairs`) and the parsing of list options.

Only typer and the standard library are imported at module level (see :mod:`jsae.cli`)."""

from __future__ import annotations

import math
from typing import Any, Callable, NoReturn

import typer
from typer.core import TyperGroup


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


def click_exceptions() -> Any:
    """The exceptions module of the click that typer runs on: typer >= 0.2x vendors its own (``typer._click``),
    older versions (down to jsae's floor) use the ``click`` package."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


class OneLineGroup(TyperGroup):
    """A command group whose usage errors (an option out of range, a wrong type, a missing or unknown option) are
    one line on stderr, ``error: ...`` with exit code 2, like every other error of the command line; the
    sub-commands' errors come through :meth:`invoke`, the group's own through :meth:`make_context`."""

    def _one_line(self, exc: Exception) -> NoReturn:
        ctx = getattr(exc, "ctx", None)
        path = " ".join(["jsae", *(getattr(ctx, "command_path", None) or "jsae").split()[1:]])  # (a test runner's name aside)
        msg = exc.format_message().strip().replace("\n", " ").rstrip(".")  # type: ignore[attr-defined]
        typer.echo(f"error: {msg} (see `{path} --help`)", err=True)
        raise typer.Exit(2)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return plain_flags(super().get_command(ctx, cmd_name))

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        UsageError = click_exceptions().UsageError  # noqa: N806

        plain_flags(self)
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            if debugging():
                raise
            self._one_line(exc)

    def invoke(self, ctx: Any) -> Any:
        UsageError = click_exceptions().UsageError  # noqa: N806

        try:
            return super().invoke(ctx)
        except UsageError as exc:
            if debugging():
                raise
            self._one_line(exc)


def plain_flags(command: Any) -> Any:
    """``command`` with its boolean flags shown in ``--help`` as flags (``--revival / --no-revival``, ``--help``)
    rather than with typer's type column ``<bool>``, which reads as if the flag took a value."""
    if command is None or "get_params" in vars(command):
        return command
    get_params = command.get_params

    def params_shown_plainly(ctx: Any) -> Any:  # the options and the --help option click adds per context
        params = get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.display_type_rich = lambda ctx=None: None
        return params

    command.get_params = params_shown_plainly
    return command


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           why: str = "") -> Callable[[Any], Any]:
    """A typer ``callback=`` that refuses (one line, naming the option) a value outside ``[lo, hi]`` (open ends with
    ``lo_open`` / ``hi_open``), and NaN or inf; ``None`` (an option left out) passes.  ``why`` explains the bound."""

    def show(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

    def words() -> str:
        parts = []
        if lo is not None:
            parts.append(f"{'greater than' if lo_open else 'at least'} {show(lo)}")
        if hi is not None:
            parts.append(f"{'less than' if hi_open else 'at most'} {show(hi)}")
        return " and ".join(parts)

    def callback(value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number{' ' + words() if lo is not None or hi is not None else ''}"
                                     f", got {value}")
        bad = lo is not None and (value <= lo if lo_open else value < lo)
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise typer.BadParameter(f"must be {words() or 'a finite number'}, got {value}" + (f" ({why})" if why else ""))
        return value

    return callback


SEED = number(0, 2**32 - 1, why="numpy's and torch's seeds")
STEPS = number(1, 10**9, why="a billion steps is beyond any run here")
LAYER = number(0, 9999)
D_SAE = number(1, 2**24, why="16M latents; the memory an SAE needs is checked when it is built")
EXPANSION = number(1, 1024, why="an SAE 1024 times the model's width")
THREADS = number(1, 1024)
TOKENS = number(1, 65536, why="longer than any model's context")


def world_pairs(lo: int = 1) -> Callable[[Any], Any]:
    """:func:`number` (at least ``lo``) for a count of world pairs or scenes, which are generated and held in
    memory: a count whose estimated memory exceeds this machine's is refused up front, with the estimate."""
    at_least = number(lo)

    def callback(value: Any) -> Any:
        at_least(value)
        if value:
            from jsae.data.sources import check_world_pairs

            try:
                check_world_pairs(value, None)
            except MemoryError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return callback


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


__all__ = ["D_SAE", "LAYER", "OneLineGroup", "SEED", "STEPS", "THREADS", "TOKENS", "data_source", "debugging", "fail",
           "float_list", "guard_app", "guard_command", "int_list", "model_options", "number", "one_line", "plain_flags", "set_debug",
           "world_pairs"]
