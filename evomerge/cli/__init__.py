"""Command line: `evomerge <command>`.

Each command lives in its own module and imports torch & co. inside its body, so that
`--help` and argument errors answer instantly. Process-wide settings (threads, Hugging Face
variables, Optuna's logging) are made by the commands through `cli.process.set_up_process`.
"""

import logging
import sys

import click

from evomerge import __version__
from evomerge.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="evomerge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Learned model merging: classic merges and searches over merge recipes."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    from evomerge.cli import (
        check_cmd,
        eval_cmd,
        export_cmd,
        merge_cmd,
        plan_cmd,
        pool_cmd,
        report_cmd,
        search_cmd,
    )

    modules = (
        merge_cmd,
        check_cmd,
        plan_cmd,
        pool_cmd,
        eval_cmd,
        search_cmd,
        export_cmd,
        report_cmd,
    )
    for module in modules:
        for command in getattr(module, "commands", None) or (module.command,):
            cli.add_command(command)


_register_commands()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
