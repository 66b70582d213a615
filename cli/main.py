"""`fps-graph`: the click app. Thin: parses options, calls the library, prints; errors become one stderr line."""
from __future__ import annotations

import importlib
import sys
import traceback

import click

from fps_graph import FpsGraphError, __version__
from fps_graph.errors import RuntimeFailure


# The subcommands, loaded only when one is run or asked for help: `fps-graph --help` lists them from here and
# imports no onnx, onnxruntime or numpy (start-up under a second; tests/test_startup.py). Each command module imports
# what it needs at its top.
COMMANDS: dict[str, tuple[str, str, str]] = {   # name -> (module, attribute, one line for `fps-graph --help`)
    "inspect": ("fps_graph_cli.inspect_cmd", "inspect", "List the layers of MODEL that selection scores."),
    "select": ("fps_graph_cli.select_cmd", "select", "Select the weights of MODEL to fine-tune from calibration DATA."),
    "train": ("fps_graph_cli.train_cmd", "train", "Fine-tune the selected weights (PyTorch)."),
    "apply": ("fps_graph_cli.apply_cmd", "apply", "Write the fine-tuned values back into the ONNX model."),
    "export": ("fps_graph_cli.export_cmd", "export",
               "Export a PyTorch factory or a Hugging Face folder (hf:DIR) to ONNX."),
    "compare": ("fps_graph_cli.compare_cmd", "compare", "FPS vs random vs LoRA at the same count, on your model and "
                                                          "data."),
}
NEEDS_TORCH = {"train"}   # stand-ins that say what to install where torch is missing


def _needs_torch(name: str) -> click.Command:
    """Stand-in for a subcommand whose module needs torch where torch is not installed: says what to install."""
    from fps_graph_cli.common import TORCH_INSTALL

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   add_help_option=False, help=f"(needs torch: {TORCH_INSTALL})")
    def stub() -> None:
        raise RuntimeFailure(f"`fps-graph {name}` needs torch, which is not installed: {TORCH_INSTALL}")

    return stub


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when used (click's documented lazy-loading pattern).

    An ImportError while loading one is a bug and surfaces as one (a command never vanishes); only a missing torch,
    the optional extra, turns ``train`` into a stub that says what to install.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if name in NEEDS_TORCH and exc.name == "torch":
                return _needs_torch(name)
            raise
        return getattr(loaded, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fps-graph")
@click.option("--debug", is_flag=True, help="On an error, print the traceback with its chain of causes after the "
                                            "one-line message (for bug reports).")
def cli(debug: bool) -> None:
    """Forward-only parameter selection (FPS) for sparse fine-tuning, on ONNX graphs."""


def all_commands() -> dict[str, click.Command]:
    """Every subcommand, loaded (for tests and tools that walk the options)."""
    ctx = click.Context(cli)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def _debug_requested(argv: list[str]) -> bool:
    """Whether the group option --debug comes before the subcommand (read from argv: an error can come before
    click has parsed anything, e.g. while the subcommands load)."""
    for arg in argv:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


# click >= 8.2 raises this for a group called without arguments; older versions print the help and exit themselves
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def entry(argv: list[str] | None = None) -> int:
    """Console-script entry: run the app; bad input gives one line on stderr and exit code 2, never a traceback
    (``--debug`` adds the traceback and its causes after that line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    failure: BaseException | None = None
    try:
        rv = cli.main(args=args, prog_name="fps-graph", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except _NO_ARGS as exc:    # `fps-graph` alone: the help, as click prints it (exit 2)
        exc.show()
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
        code, failure = 2, exc
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("error: interrupted; no output written", err=True)
        code = 130
    except MemoryError as exc:
        click.echo("error: out of memory (try a smaller --batch-size)", err=True)
        code, failure = 1, exc
    except ImportError as exc:   # an optional package missing below the subcommands' own checks (common.require)
        top = (getattr(exc, "name", None) or "").split(".")[0]
        if top in ("fps_graph", "fps_graph_cli"):
            raise                # our own module failing to import is a bug: its traceback is the report
        name = top or _one_line(str(exc))
        click.echo(f"error: the Python package {name!r} is missing or broken: pip install {name}", err=True)
        code, failure = 2, exc
    if debug and failure is not None:
        traceback.print_exception(type(failure), failure, failure.__traceback__, file=sys.stderr)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    entry()
