"""``python -m gradshard.cli``: the ``gradshard`` command."""

from gradshard.cli.main import run

run()
