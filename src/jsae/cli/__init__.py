"""The ``jsae`` command line (typer), one group per step of the data flow:

* ``jsae run ...``: ``demo`` (the protocol end to end; also ``jsae demo``), ``sweep``, ``capture``
  (:mod:`jsae.cli.run`);
* ``jsae sae ...``: ``train``, ``label``, ``steer`` one JSAE (:mod:`jsae.cli.sae`);
* ``jsae look ...``: ``features``, ``export-neuronpedia``, ``core-metrics`` (:mod:`jsae.cli.look`);
* ``jsae release ...``: ``build``, ``build-shipped``, ``list``, ``push``, ``pull``, ``yaml``
  (:mod:`jsae.cli.release`);
* ``jsae world ...`` (:mod:`jsae.cli.world`) and ``jsae vista ...`` (:mod:`jsae.cli.vista`).

The flat names of earlier versions (``jsae capture``, ``train``, ``label``, ``steer``, ``sweep``,
``features``, ``export-neuronpedia``, ``core-metrics``, ``version``) still work, hidden from ``--help``.

Every module of this package imports at module level only typer, the standard library and other
``jsae.cli`` modules, the latter only as ``from jsae.cli.<module> import <name>`` (``from jsae.cli import
<module>`` and ``import jsae.cli.<module>`` import the package ``jsae`` as well); a command imports its work
when it runs.  The console script (:mod:`_jsae_cli`) loads this package before the package ``jsae``, so
``jsae --help`` never imports torch or SAELens.  Errors are one line on stderr (``error: ...``) with exit
code 2 (:func:`jsae.cli._common.fail`).
"""

from __future__ import annotations

import typer

from jsae.cli._common import THREADS, OneLineGroup, guard_app, set_debug
from jsae.cli.look import core_metrics, export_neuronpedia, features, look_app
from jsae.cli.release import release_app
from jsae.cli.run import capture, demo, run_app, sweep
from jsae.cli.sae import label, sae_app, steer, train
from jsae.cli.vista import vista_app
from jsae.cli.world import world_app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jsae")
    except PackageNotFoundError:  # run from a source tree that is not installed
        import jsae

        return jsae.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version())
        raise typer.Exit()


app = typer.Typer(help="Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_policy(threads: int | None, cores: int | None = None) -> int:
    """torch CPU threads for a command: ``threads`` when given, else one per two cores (at least 1, at most 8):
    the toy world's small matrices thrash with a thread per core on a busy machine (2 threads on 2 shared
    cores made the demo 7x slower), and gain little from more threads when idle (see the README)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads must be at least 1")
        return threads
    import os

    return max(1, min(8, (cores or os.cpu_count() or 1) // 2))


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the jsae version and exit."),
          threads: int = typer.Option(None, "--threads", callback=THREADS, help="torch CPU threads (default: one per two cores, at most 8; "
                                                             "OMP_NUM_THREADS set by you wins)"),
          debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error instead of one line")) -> None:
    import os

    set_debug(debug)
    # OpenMP threads sleep between parallel regions instead of spinning: the sparse training step is hundreds of
    # small operations, and spinning threads on a shared machine made it 2-4x slower (benchmarks/train_throughput.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None and any(v in os.environ for v in THREAD_VARS):
        return  # the user's own setting
    n = str(thread_policy(threads))
    for var in THREAD_VARS:  # read by torch when a command first imports it
        os.environ[var] = n
    if "torch" in __import__("sys").modules:
        __import__("torch").set_num_threads(int(n))


app.add_typer(run_app, name="run")
app.add_typer(sae_app, name="sae")
app.add_typer(look_app, name="look")
app.add_typer(release_app, name="release")
app.add_typer(world_app, name="world")
app.add_typer(vista_app, name="vista")

# the main job keeps its top-level name: `jsae demo --out runs/demo` is the README's first command
app.command("demo")(demo)


def version() -> None:
    """Print the jsae version."""
    typer.echo(_version())


for _name, _command in {"capture": capture, "sweep": sweep, "train": train, "label": label, "steer": steer,
                        "features": features, "export-neuronpedia": export_neuronpedia, "core-metrics": core_metrics,
                        "version": version}.items():
    app.command(_name, hidden=True)(_command)  # the flat names of earlier versions

guard_app(app)  # every command: one-line errors, never a traceback (unless --debug)

__all__ = ["app"]

if __name__ == "__main__":
    app()
