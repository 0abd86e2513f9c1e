"""Checks made at the public boundary, before any expensive step, each failing with one line that names the fix.

* :func:`check_output_dir` / :func:`check_output_file`: a path we are going to write is not a file (or a
  folder), and it or its nearest existing parent is writable;
* :func:`confined`: a relative name read from a manifest or archive stays inside its target folder;
* :func:`check_device`: a torch device that exists on this machine;
* :func:`check_allocation`: a tensor allocation that fits the machine's memory; :func:`parse_bytes`: a size with
  its unit (``80GiB``);
* :func:`shape_checked`: jaxtyping's shape and dtype checks with the failure translated into one line
  naming the argument, the expected shape and what was passed; :func:`typechecked` the same checks with
  jaxtyping's own errors, through jsae's small type checker :func:`check_types` (no beartype: see there).
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


# ---- paths ----------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike[str], flag: str = "the output folder") -> Path:
    """``path`` can be a folder we write into: not an existing file, no file among its parents, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a folder; pass a folder path (or remove the file)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise NotADirectoryError(f"{flag} {path} cannot be created: {base} is a file; pass a path under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path} is not writable ({base} is read-only); pass a folder you can write to")
    return path


def check_output_file(path: str | os.PathLike[str], flag: str = "the output file") -> Path:
    """``path`` can be written as a file: not a folder, its parent folder creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; pass a file path")
    check_output_dir(path.parent, f"the folder of {flag}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path} is read-only; pass a file you can write")
    return path


def confined(root: str | os.PathLike[str], name: str, what: str = "a file name") -> Path:
    """``root / name`` when ``name`` is a plain relative path that stays inside ``root`` (no absolute path, no
    ``..``, no drive, no backslash tricks, no symlink leading out); a one-line ``ValueError`` otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} is not a plain relative path; refusing to write it")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or name.startswith("~"):
        raise ValueError(f"{what} {name!r} points outside its folder; refusing to write it (the source is corrupt or hostile)")
    root = Path(root)
    target = root / pure
    base = root.resolve()
    if not target.resolve().is_relative_to(base):
        raise ValueError(f"{what} {name!r} resolves outside {root} (through a symlink); refusing to write it")
    return target


# ---- devices and memory ---------------------------------------------------------------------------


def check_device(device: Any, flag: str = "device") -> Any:
    """A torch device that exists here: ``"cuda"`` without a GPU, ``"cuda:3"`` on a 2-GPU machine or ``"mps"``
    without Metal is refused with one line."""
    import torch

    if device is None:
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{flag} {device!r} is not a torch device ({str(exc).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag}={device!r} but this machine has no usable CUDA GPU; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag}={device!r} but this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{flag}={device!r} but MPS is not available here; use device='cpu'")
    return device


def device_memory(device: Any = "cpu") -> int:
    """Total memory in bytes of ``device`` (a GPU's, or the machine's RAM for the CPU)."""
    import torch

    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62


def human_size(n: float) -> str:
    """``n`` bytes for a person: ``'1.5 GB'``."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1024 or unit == "EB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} EB"  # pragma: no cover


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(value: Any, flag: str = "size") -> int:
    """Bytes of a size written with its unit (``"80GiB"``, ``"24 GB"``, ``"512MiB"``; GB = 10^9, GiB = 2^30) or a
    positive int of bytes; anything else (no unit, a negative or zero size) is refused with one line."""
    import re

    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{flag} must be a positive size, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(value)) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{flag} {value!r} is not a size; write a number with its unit, e.g. 80GiB, 24GB or 512MiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"{flag} must be a positive size, got {value!r}")
    return n


def check_allocation(n_bytes: float, device: Any, what: str, fix: str) -> None:
    """Refuse ``n_bytes`` when it exceeds the memory of ``device`` (before torch tries and the OS kills us)."""
    total = device_memory(device)
    if n_bytes > total:
        raise MemoryError(f"{what} needs {human_size(n_bytes)} but {device or 'cpu'} has {human_size(total)} in all; {fix}")


# ---- jaxtyping at the boundary --------------------------------------------------------------------


def _expected(annotation: Any) -> tuple[str, tuple[str, ...]] | None:
    """(dtype words, dims) of a jaxtyping annotation such as ``Float[Tensor, "n d_in"]``, else None."""
    dims = getattr(annotation, "dim_str", None)
    if dims is None:
        return None
    dtypes = getattr(annotation, "dtypes", ())
    kind = ("float" if any("float" in str(d) for d in dtypes) else
            "bool" if dtypes and all("bool" in str(d) for d in dtypes) else "numeric")
    return kind, tuple(dims.split())


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = str(getattr(x, "dtype", type(x).__name__)).removeprefix("torch.")
    return f"{dtype} {list(shape)}" if shape is not None else type(x).__name__


def _diagnose(fn: Callable[..., Any], args: tuple, kwargs: dict) -> str | None:
    """Our own reading of which argument breaks the annotations of ``fn``: one line, or None."""
    import torch

    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    import typing

    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve: no diagnosis
        return None
    sizes: dict[str, tuple[int, str]] = {}
    for name, value in bound.arguments.items():
        exp = _expected(hints.get(name))
        if exp is None:
            continue
        kind, dims = exp
        want = "[" + ", ".join(d.lstrip("*") for d in dims) + "]"
        if not isinstance(value, torch.Tensor):
            return f"{name} must be a {kind} tensor of shape {want}, got {_describe(value)}"
        if kind == "float" and not value.is_floating_point():
            return f"{name} must be a float tensor of shape {want}, got {_describe(value)}; convert it with .float()"
        if kind == "bool" and value.dtype != torch.bool:
            return f"{name} must be a bool tensor of shape {want}, got {_describe(value)}; convert it with .bool()"
        fixed = [d for d in dims if not d.startswith("*")]
        variadic = len(fixed) != len(dims)
        if (value.dim() < len(fixed)) if variadic else (value.dim() != len(fixed)):
            return f"{name} must have shape {want} ({len(fixed)}{'+' if variadic else ''} dims), got {_describe(value)}"
        tail = value.shape[value.dim() - len(fixed):] if variadic else value.shape
        for d, n in zip(fixed, tail):
            if d.isdigit() and int(d) != n:
                return f"{name} must have shape {want} with {d} = {d}, got {_describe(value)}"
            if d in sizes and sizes[d][0] != n:
                other, size = sizes[d][1], sizes[d][0]
                return (f"{name} has {d}={n} but {other} has {d}={size} (expected {want}); "
                        f"pass tensors whose {d} sizes agree")
            sizes.setdefault(d, (int(n), name))
    return None


class TypeCheckError(TypeError):
    """An argument or return value that does not match its annotation (raised by :func:`check_types`)."""


def _accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint``: jaxtyping arrays (dtype and shape, with the dimension
    sizes bound by the enclosing ``jaxtyped`` call), classes, ``X | None`` / ``Union``, ``Literal``, and the
    container of a generic alias (``Mapping[str, Any]`` checks for a mapping); anything else is accepted."""
    import types
    import typing

    if hint is inspect.Parameter.empty or hint is Any or isinstance(hint, (str, typing.ForwardRef, typing.TypeVar)):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is typing.Annotated:
        return _accepts(value, typing.get_args(hint)[0])
    if origin is not None:
        return isinstance(value, origin) if isinstance(origin, type) else True
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_types(fn: F) -> F:
    """A run-time type checker for ``jaxtyping.jaxtyped(typechecker=check_types)``: each argument (each element
    of ``*args`` / ``**kwargs``) and the return value checked against its annotation (see :func:`_accepts`).

    jsae checks its tensor arguments with this rather than beartype: beartype cannot be imported after
    ``import nnsight`` (nnsight mounts an unhashable ``save`` method on ``object`` and beartype hashes every
    callable of ``object.__dict__`` at import), so jsae would otherwise have to be imported first."""
    sig = inspect.signature(fn)
    hints: dict[str, Any] = {}

    def hint(name: str, annotation: Any) -> Any:  # a string annotation resolved in fn's module, once
        if not isinstance(annotation, str):
            return annotation
        if name not in hints:
            try:
                hints[name] = eval(annotation, getattr(fn, "__globals__", {}))  # noqa: S307 - the code's own annotation
            except Exception:  # noqa: BLE001 - a name we cannot resolve here: not checked
                hints[name] = Any
        return hints[name]

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            param = sig.parameters[name]
            values = (value if param.kind is param.VAR_POSITIONAL else
                      value.values() if param.kind is param.VAR_KEYWORD else (value,))
            for v in values:
                if not _accepts(v, hint(name, param.annotation)):
                    raise TypeCheckError(f"{fn.__qualname__}: {name} must be {param.annotation}, got {_describe(v)}")
        out = fn(*args, **kwargs)
        if not _accepts(out, hint("return", sig.return_annotation)):
            raise TypeCheckError(f"{fn.__qualname__} must return {sig.return_annotation}, returned {_describe(out)}")
        return out

    return checked  # type: ignore[return-value]


def typechecked(fn: F) -> F:
    """``jaxtyping.jaxtyped(typechecker=check_types)(fn)``: jaxtyping's shape and dtype checks of ``fn``'s
    annotated arguments and return value (errors are jaxtyping's multi-line ``TypeCheckError``; public
    boundaries use :func:`shape_checked` for one line)."""
    from jaxtyping import jaxtyped

    return jaxtyped(typechecker=check_types)(fn)  # type: ignore[return-value]


def shape_checked(fn: F) -> F:
    """:func:`typechecked` ``fn`` whose failures raise one line (``TypeError`` for a wrong type or dtype,
    ``ValueError`` for a wrong shape) naming the argument and the expected shape."""
    checked = typechecked(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return checked(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - jaxtyping raises its own error types
            if not _is_type_check_error(exc):
                raise
            why = _diagnose(fn, args, kwargs)
            if why is None:  # the return value, or a case we do not read: first line of the checker's text
                why = (str(exc).strip().splitlines() or ["type check failed"])[0]
            qual = fn.__qualname__.replace(".__init__", "")
            err = TypeError if "must be a" in why else ValueError
            raise err(f"{qual}: {why}") from None

    return wrapper  # type: ignore[return-value]


def _is_type_check_error(exc: Exception) -> bool:
    mod = type(exc).__module__ or ""
    return isinstance(exc, TypeCheckError) or mod.startswith("jaxtyping") or type(exc).__name__ == "TypeCheckError"


__all__ = ["TypeCheckError", "check_allocation", "check_device", "check_output_dir", "check_output_file", "check_types",
           "confined", "device_memory", "shape_checked", "typechecked"]
