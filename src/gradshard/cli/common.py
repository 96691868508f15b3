"""What the command groups share: the console, progress bars, executors and stores by name, atomic files."""

from __future__ import annotations

import enum
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
from gradshard.errors import StoreError
from gradshard.runtime import Executor, InlineExecutor, LocalExecutor
from gradshard.security.tokens import TokenIssuer
from gradshard.store import LocalStore, S3Store, Store, open_store
from gradshard.units import MIB

# -h and --help on every command, set on each command itself: click caches a command's help option, so one used
# under another group first (as tests do) would otherwise keep that group's names.
HELP_OPTIONS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}

console = Console(width=None if sys.stdout.isatty() else 150)


class ShardsParam(click.ParamType[int | str, Any]):
    """``--shards``: a number of shard functions (at least 1), or ``auto`` (one per worker)."""

    name = "M|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value  # type: ignore[no-any-return]
        try:
            shards = int(value)
        except ValueError:
            shards = 0
        if shards < 1:
            self.fail(f"{value!r} is neither a number of shards (at least 1) nor 'auto'", param, ctx)
        return shards


SHARDS = ShardsParam()


class ExitCode(enum.IntEnum):
    """The exit status of every ``gradshard`` command (listed in ``gradshard --help`` and the README)."""

    OK = 0
    NEGATIVE = 1  # the command ran, its verdict is negative (non-finite values, nothing feasible, ...)
    USAGE = 2  # click's usage errors
    ERROR = 3  # a GradshardError: bad input, a failed round, an unreachable store
    MISSING_EXTRA = 4  # the command needs an optional extra that is not installed (gradshard.extras)
    PRIVACY_BUDGET = 5  # a central-DP release would exceed max_epsilon: refused before any noise was drawn
    INTERRUPTED = 130


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def make_executor(kind: str, workers: int, memory_mb: float | None, retries: int, timeout: float,
              warm: bool = False, ray_address: str | None = None, lambda_function: str | None = None,
              region: str | None = None, scoped_tokens: bool = False) -> Executor:
    """An executor by name (close it when done). Ray and boto3 are imported only when asked for.

    ``scoped_tokens``: every attempt carries an invocation token (the key from ``GRADSHARD_TOKEN_PRIVATE_KEY`` if
    set, which a deployed Lambda function's public key must match, else a fresh one per executor)."""
    cap = None if memory_mb is None else int(memory_mb * MIB)
    tokens = TokenIssuer.from_env() if scoped_tokens else None
    if kind == "inline":
        return InlineExecutor(retries=retries, tokens=tokens)
    if kind == "ray":
        from gradshard.runtime.ray import RayExecutor

        return RayExecutor(address=ray_address, workers=workers, retries=retries, memory_cap_bytes=cap,
                           timeout_s=timeout, tokens=tokens)
    if kind == "lambda":
        from gradshard.runtime.aws_lambda import LambdaExecutor

        if not lambda_function:
            raise click.UsageError("--executor lambda needs --lambda-function (the deployed function's name or ARN)")
        return LambdaExecutor(lambda_function, region=region, workers=workers, retries=retries, timeout_s=timeout,
                              tokens=tokens)
    return LocalExecutor(workers=workers, retries=retries, memory_cap_bytes=cap, timeout_s=timeout, warm=warm,
                         tokens=tokens)


SCOPED_TOKENS_HELP = ("Every function invocation carries a short-lived Ed25519-signed token scoped to its function, "
                      "round and range, used once; the functions refuse any other (docs/invocation-tokens.md). "
                      "Costs about 3 ms per invocation.")


def open_cli_store(location: str, *, must_exist: bool) -> Store:
    """``s3://bucket/prefix`` (endpoint and credentials from the AWS environment) or a local directory."""
    if location.startswith("s3://"):
        store = open_store(location)
        if isinstance(store, S3Store) and not store.bucket_exists(quick=True):
            raise StoreError(f"bucket {store.bucket!r} does not exist at {store.endpoint_url or 'AWS'} (--store "
                             f"{location}); create it first, or check AWS_ENDPOINT_URL")
        return store
    if must_exist and not Path(location).is_dir():
        raise click.BadParameter(f"directory {location!r} does not exist", param_hint="--store")
    return LocalStore(location)


def run_aggregate(store: Store, r: int, executor: Executor, config: AggregateConfig,
                   label: str) -> AggregateResult:
    with progress_bar() as progress:
        task = progress.add_task(label, total=None)
        return aggregate_round(store, r, executor, config, on_done=lambda _: progress.advance(task))


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def sha256_of(store: LocalStore, key: str) -> str:
    digest = hashlib.sha256()
    size = store.size(key)
    with store.open_reader(key) as reader:
        for offset in range(0, size, 64 * MIB):
            buf = bytearray(min(64 * MIB, size - offset))
            reader.read_into(offset, memoryview(buf))
            digest.update(buf)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
