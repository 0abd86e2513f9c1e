"""The ``jsae`` console script: the CLI of :mod:`jsae.cli`, loaded without importing the package ``jsae``.

``import jsae.cli`` would first run ``jsae/__init__.py``, which registers jsae with SAELens and so imports
torch, transformers and sae_lens (seconds), while ``jsae --help`` needs none of that: the modules of
``jsae/cli/`` import only typer and the standard library, and each command imports its work when it runs.
So :func:`main` finds the package ``jsae`` without importing it (``importlib.util.find_spec``), loads its
``cli`` subpackage from there with the standard importlib calls (``PathFinder.find_spec``,
``module_from_spec``, ``exec_module``: what ``import`` itself does) and runs ``jsae.cli.app``.  When a
command then imports ``jsae.<anything>``, Python imports the package ``jsae`` the ordinary way, its
``__init__`` first; help, ``--version`` and usage errors never do.

Before that, the CLI modules import each other only as ``from jsae.cli.<module> import <name>``:
``import jsae.cli.x`` and ``from jsae.cli import x`` go through ``__import__("jsae.cli.x")``, which returns
(and so imports) the package ``jsae``.
"""

from __future__ import annotations

import sys
from typing import Any


def load_cli() -> Any:
    """``jsae.cli`` (the module), loaded without importing the package ``jsae`` unless it is imported already."""
    if "jsae.cli" not in sys.modules and "jsae" not in sys.modules:
        from importlib.machinery import PathFinder
        from importlib.util import find_spec, module_from_spec

        package = find_spec("jsae")  # finds the package; does not import it
        spec = PathFinder.find_spec("jsae.cli", package.submodule_search_locations) if package else None
        if spec is not None and spec.loader is not None:
            module = module_from_spec(spec)
            sys.modules["jsae.cli"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                for name in [n for n in sys.modules if n == "jsae.cli" or n.startswith("jsae.cli.")]:
                    del sys.modules[name]
                raise
    from importlib import import_module

    return import_module("jsae.cli")  # the module loaded above; an ordinary import when it was not


def main() -> Any:
    """Run the ``jsae`` command line."""
    return load_cli().app()


if __name__ == "__main__":
    sys.exit(main())
