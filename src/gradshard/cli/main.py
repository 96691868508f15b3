"""The ``gradshard`` command: a thin layer where every command is one library call.

Each command group lives in its own module (aggregate, train, demo, cost, deploy); this module is the group
and the entry point that turns every gradshard error into one clear line and exit code 2."""

from __future__ import annotations

import logging
import sys

import click

from gradshard import __version__
from gradshard.cli.aggregate import aggregate, compare, inspect
from gradshard.cli.common import console
from gradshard.cli.cost import cost, plan
from gradshard.cli.demo import demo
from gradshard.cli.deploy import deploy
from gradshard.cli.gc import gc
from gradshard.cli.train import train
from gradshard.errors import GradshardError


@click.group()
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
def main(verbose: bool) -> None:
    """gradshard: federated aggregation sharded across memory-capped functions."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


for command in (aggregate, inspect, compare, train, demo, cost, plan, deploy, gc):
    main.add_command(command)


def run() -> None:
    """Entry point that turns gradshard errors into one clear line and exit code 2."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GradshardError as exc:
        console.print(f"[red]error[/]: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    run()


if __name__ == "__main__":
    run()
