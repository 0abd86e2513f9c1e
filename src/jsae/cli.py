"""The ``jsae`` command line (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def version() -> None:
    """Print the jsae version."""
    import jsae

    typer.echo(jsae.__version__)


if __name__ == "__main__":
    app()
