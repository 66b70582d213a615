"""`fps-graph`: the click app. Thin: parses options, calls the library, prints; errors become one stderr line."""
from __future__ import annotations

import sys

import click

from fps_graph import FpsGraphError, __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fps-graph")
def cli() -> None:
    """Forward-only parameter selection (FPS) for sparse fine-tuning, on ONNX graphs."""


def _register() -> None:
    """Add the subcommands (once): imported inside ``entry`` so that Ctrl-C while they load is caught there too."""
    if cli.commands:
        return
    from fps_graph_cli import export_cmd, inspect_cmd, select_cmd

    cli.add_command(inspect_cmd.inspect)
    cli.add_command(select_cmd.select)
    cli.add_command(export_cmd.export)
    try:
        from fps_graph_cli import train_cmd

        cli.add_command(train_cmd.train)
    except ImportError:
        pass
    try:
        from fps_graph_cli import apply_cmd

        cli.add_command(apply_cmd.apply)
    except ImportError:
        pass



def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def entry(argv: list[str] | None = None) -> int:
    """Console-script entry: run the app; bad input gives one line on stderr and exit code 2, never a traceback."""
    try:
        _register()
        rv = cli.main(args=argv, prog_name="fps-graph", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.UsageError as exc:
        hint = f" (see fps-graph {exc.ctx.command_path.split(' ', 1)[1] if exc.ctx and ' ' in exc.ctx.command_path else ''} --help)"
        click.echo(f"error: {_one_line(exc.format_message())}{hint.replace('  ', ' ')}", err=True)
        code = 2
    except click.exceptions.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        code = exc.exit_code or 2
    except FpsGraphError as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        code = 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("error: interrupted; no output written", err=True)
        code = 130
    except MemoryError:
        click.echo("error: out of memory (try a smaller --batch-size)", err=True)
        code = 1
    except ImportError as exc:   # an optional package missing below the subcommands' own checks (common.require)
        name = (getattr(exc, "name", None) or "").split(".")[0] or _one_line(str(exc))
        click.echo(f"error: the Python package {name!r} is missing or broken: pip install {name}", err=True)
        code = 2
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    entry()
