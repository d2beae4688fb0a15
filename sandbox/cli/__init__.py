"""The ``sandbox`` command line: one module per command, assembled here. The top layer: may import every
package (only ``ablate`` imports ``sweep``)."""

from __future__ import annotations

import sys

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from sandbox.cli import ablate, bench, compare, evaluate, plan, plot, plugins, predict, probe, recipe, run
from sandbox.errors import SandboxError, error_line, lower_first, on_process

app = typer.Typer(
    help="A plugin-architecture research sandbox for semi-supervised semantic segmentation (DDFP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    """Global options."""


app.command("run")(run.run)
app.command("eval")(evaluate.evaluate)
app.command("plugins")(plugins.plugins)
app.command("bench")(bench.bench)
app.command("plan")(plan.plan)
app.add_typer(recipe.app, name="recipe")
app.command("compare")(compare.compare)
app.command("ablate")(ablate.ablate)
app.command("plot")(plot.plot)
app.command("predict")(predict.predict)
app.command("probe")(probe.probe)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2 (unless ``--debug``)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        status = app(args=args, prog_name="sandbox", standalone_mode=False)
    except NoArgsIsHelpError as error:  # the help is already printed
        sys.exit(error.exit_code)
    except ClickException as error:  # a usage mistake: the same one line as every other error
        print(error_line(usage_message(error)), file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        print(error_line("aborted"), file=sys.stderr)
        sys.exit(1)
    except SandboxError as error:
        if "--debug" in args:
            raise
        if not in_process_group():
            print(error_line(str(error)), file=sys.stderr)
            sys.exit(error.exit_code)
        from torch import distributed

        from sandbox.processes.failures import exit_together

        message = str(error) if error.shared else on_process(str(error), distributed.get_rank())
        print(error_line(message), file=sys.stderr)
        exit_together(error.exit_code, message)  # every process prints its line before any of them exits
    else:
        sys.exit(status if isinstance(status, int) else 0)


def usage_message(error: ClickException) -> str:
    """A command-line parser's error as our message: its sentence, then where to find the usage
    (``missing argument 'recipe'; see 'sandbox run --help'``)."""
    message = lower_first(error.format_message().strip().replace("Value error, ", "")).removesuffix(".")
    context = getattr(error, "ctx", None)
    return f"{message}; see '{context.command_path} --help'" if context is not None else message


def in_process_group() -> bool:
    """Whether this process belongs to an initialised torch.distributed group (never imports torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
