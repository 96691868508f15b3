"""``gradshard deploy aws``: write the Lambda package, CloudFormation template and deploy commands.

A thin click command over :func:`gradshard.deploy.aws.write_aws_deployment`; ``gradshard.cli.main`` registers it.
"""

from __future__ import annotations

import importlib.util
import sys

import click
from rich.console import Console

from gradshard.cli.common import HELP_OPTIONS
from gradshard.cli.console import untrusted
from gradshard.deploy.aws import (
    ARCHITECTURES,
    DEFAULT_RUNTIME,
    LAMBDA_RUNTIMES,
    MAX_TIMEOUT_S,
    write_aws_deployment,
)
from gradshard.errors import GradshardError
from gradshard.extras import missing_extra_error, require_extra
from gradshard.runtime.aws_lambda import LAMBDA_MEMORY_MB

console = Console(width=None if sys.stdout.isatty() else 150)


@click.group(context_settings=HELP_OPTIONS)
def deploy() -> None:
    """Write what a cloud deployment needs (nothing is sent anywhere)."""


@deploy.command(context_settings=HELP_OPTIONS)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write the files to.")
@click.option("--memory-mb", type=click.IntRange(*LAMBDA_MEMORY_MB), default=3008, show_default=True,
              help="Function memory, MiB (the template's MemorySize default).")
@click.option("--timeout", type=click.IntRange(1, MAX_TIMEOUT_S), default=900, show_default=True,
              help="Function timeout, seconds.")
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="x86_64", show_default=True)
@click.option("--runtime", type=click.Choice(list(LAMBDA_RUNTIMES)), default=DEFAULT_RUNTIME, show_default=True,
              help="Lambda Python runtime (python3.11 runs on Amazon Linux 2, whose glibc 2.26 is too old for the "
                   "pinned numpy's wheels; python3.12+ run on Amazon Linux 2023).")
@click.option("--vendor/--no-vendor", default=None,
              help="Copy this environment's dependencies into package.zip (same Linux, CPython, machine and a glibc "
                   "the runtime has), or write requirements.txt and build.sh instead [default: vendor when this "
                   "environment can, else build.sh].")
def aws(out: str, memory_mb: int, timeout: int, arch: str, runtime: str, vendor: bool | None) -> None:
    """Write package.zip, template.yaml and DEPLOY.md for an AWS Lambda aggregation function."""
    require_extra("s3", "gradshard deploy aws")  # the functions' S3 client; vendored or pinned from here
    with console.status("writing package.zip"):
        try:
            result = write_aws_deployment(out, memory_mb=memory_mb, timeout_s=timeout, architecture=arch,
                                          vendor=vendor is not False, runtime=runtime)
        except GradshardError as exc:
            if vendor is not None:
                raise
            console.print(f"[yellow]not vendoring[/]: {untrusted(exc)}")
            result = write_aws_deployment(out, memory_mb=memory_mb, timeout_s=timeout, architecture=arch,
                                          vendor=False, runtime=runtime)
    for path in result.paths:
        console.print(f"wrote {untrusted(path)} ({path.stat().st_size:,} bytes)")
    if result.code_key is not None:
        console.print("package.zip holds gradshard and its runtime dependencies; upload it as "
                      f"{untrusted(result.code_key)}")
    else:
        console.print("package.zip holds gradshard only: run build.sh to add its dependencies for Lambda")
    console.print(f"next: follow {untrusted(result.guide)}")


@deploy.command(context_settings=HELP_OPTIONS)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write the files to.")
@click.option("--memory-mb", type=click.IntRange(*LAMBDA_MEMORY_MB), default=None,
              help="Memory of the aggregation and server function, MiB [default: the planner's for --model and "
                   "--clients, else 3008].")
@click.option("--model", "model_name", default=None,
              help="A zoo layout (resnet18, vgg16, gpt2-large, synthetic-<N>, ...) to plan the aggregation memory for.")
@click.option("--clients", type=click.IntRange(min=1), default=20, show_default=True,
              help="Clients per round, for the plan.")
@click.option("--client-memory-mb", type=click.IntRange(*LAMBDA_MEMORY_MB), default=3008, show_default=True,
              help="Memory of the client function, MiB.")
@click.option("--timeout", type=click.IntRange(1, MAX_TIMEOUT_S), default=900, show_default=True,
              help="Function timeout, seconds.")
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="x86_64", show_default=True)
def sam(out: str, memory_mb: int | None, model_name: str | None, clients: int, client_memory_mb: int, timeout: int,
        arch: str) -> None:
    """Write an AWS SAM application (template.yaml, Dockerfile, events, DEPLOY.md) for training on Lambda."""
    require_extra("s3", "gradshard deploy sam")  # the functions' S3 client
    if importlib.util.find_spec("yaml") is None:  # PyYAML (in the s3 extra) writes the template
        raise missing_extra_error("s3", "gradshard deploy sam", ["yaml"])
    from gradshard.core.zoo import get_layout
    from gradshard.deploy.sam import planned_memory, write_sam_deployment

    plan = None
    if memory_mb is None and model_name is not None:
        plan = planned_memory(get_layout(model_name).numel, clients)
        console.print(f"planned: {plan.memory_mb} MiB per aggregation function (GradsSharding M = {plan.shards}, "
                      f"${plan.per_1000_rounds:.2f} per 1000 rounds predicted)")
    result = write_sam_deployment(out, memory_mb=memory_mb or 3008, client_memory_mb=client_memory_mb,
                                  timeout_s=timeout, architecture=arch, plan=plan)
    for name in result.files:
        console.print(f"wrote {untrusted(result.out_dir / name)}")
    console.print(f"next: follow {untrusted(result.out_dir / 'DEPLOY.md')}")
