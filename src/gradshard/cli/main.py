"""The ``gradshard`` command: a thin layer where every command is one library call.

Each command group lives in its own module (aggregate, train, report, demo, cost, deploy, keys); this module is the
group and the entry point. The group turns every failure into one line ``error: ...`` on stderr and a documented exit
code (:class:`~gradshard.cli.common.ExitCode`), also when it is called from Python or click's test runner."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from gradshard import __version__
from gradshard.cli.common import HELP_OPTIONS, ExitCode
from gradshard.cli.console import printable
from gradshard.errors import GradshardError, MissingExtraError, PrivacyBudgetError
from gradshard.extras import extra_of_module, missing_extra_error

EXIT_CODES_HELP = ("Exit codes: 0 done; 1 the command ran but its verdict is negative (inspect found non-finite "
                   "values, plan found nothing feasible, compare or demo found a disagreement, train aggregated no "
                   "update in any round); 2 usage error; 3 gradshard error (bad input, a failed round, a store that "
                   "cannot be reached); 4 an optional extra the command needs is not installed (the line names the "
                   "pip install); 5 a differential-privacy release would exceed max_epsilon (refused, nothing "
                   "released); 130 interrupted. Errors are one line 'error: ...' on stderr.")


class _OneLineFormatter(logging.Formatter):
    """Log lines as ``LEVEL logger: message``, with control characters from untrusted strings made visible."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _fail(message: str, code: ExitCode) -> NoReturn:
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(code)


#: Every command and the module that defines it, in the order ``--help`` lists them. A command's module is imported
#: when the command runs (or help lists it), so ``gradshard aggregate`` does not import training, keys or reports.
COMMANDS: dict[str, str] = {
    "aggregate": "gradshard.cli.aggregate", "inspect": "gradshard.cli.aggregate", "compare": "gradshard.cli.aggregate",
    "train": "gradshard.cli.train", "report": "gradshard.cli.report", "demo": "gradshard.cli.demo",
    "cost": "gradshard.cli.cost", "plan": "gradshard.cli.cost", "deploy": "gradshard.cli.deploy",
    "gc": "gradshard.cli.gc", "keys": "gradshard.cli.keys",
}


class GradshardGroup(click.Group):
    """A click group whose standalone run reports every failure as one line on stderr with its exit code, and whose
    commands load on first use (:data:`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(name for name in super().list_commands(ctx) if name not in COMMANDS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module(module), cmd_name)
        assert isinstance(command, click.Command)
        return command

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
            _fail(exc.format_message() + hint, ExitCode.USAGE)
        except click.ClickException as exc:  # e.g. a file click could not open
            _fail(exc.format_message(), ExitCode.ERROR)
        except click.Abort:  # click turns KeyboardInterrupt and EOF into Abort
            _fail("interrupted", ExitCode.INTERRUPTED)
        except MissingExtraError as exc:
            _fail(str(exc), ExitCode.MISSING_EXTRA)
        except PrivacyBudgetError as exc:
            _fail(str(exc), ExitCode.PRIVACY_BUDGET)
        except GradshardError as exc:
            _fail(str(exc), ExitCode.ERROR)
        except ModuleNotFoundError as exc:  # an import no require_extra() guarded: still name the extra
            needed = extra_of_module(exc.name or "")
            if needed is None:
                raise
            _fail(str(missing_extra_error(needed, "this command", [exc.name or needed])), ExitCode.MISSING_EXTRA)
        except OSError as exc:  # a file or directory that cannot be read or written
            _fail(str(exc), ExitCode.ERROR)
        sys.exit(code if isinstance(code, int) else ExitCode.OK)


def _log_to_stderr(level: int) -> None:
    """Log gradshard's records at ``level`` and above to this run's stderr; restored when the command ends."""
    logger = logging.getLogger("gradshard")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    click.get_current_context().call_on_close(restore)


@click.group(cls=GradshardGroup, epilog=EXIT_CODES_HELP, context_settings=HELP_OPTIONS)
@click.version_option(__version__, "-V", "--version")
@click.option("-v", "--verbose", is_flag=True, help="Also log what happens (INFO: rounds, plans, runs) to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Log errors only (no warnings).")
def main(verbose: bool, quiet: bool) -> None:
    """gradshard: federated aggregation sharded across memory-capped functions."""
    if verbose and quiet:
        raise click.UsageError("give -v/--verbose or -q/--quiet, not both")
    _log_to_stderr(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)


def run() -> None:
    """Entry point of the ``gradshard`` command (``[project.scripts]``)."""
    main(prog_name="gradshard")


if __name__ == "__main__":
    run()
