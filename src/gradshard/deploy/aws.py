"""Deployment files for AWS Lambda: the code package, a CloudFormation template and the commands to deploy them.

Nothing here talks to AWS. :func:`write_aws_deployment` writes ``package.zip`` (gradshard plus the numpy
aggregation runtime's dependencies), ``template.yaml`` (plain CloudFormation: data bucket, role, function) and
``DEPLOY.md`` (the AWS CLI commands). Dependencies are copied from this environment only when its compiled wheels
can run on the Lambda runtime (same Linux machine, same CPython, a glibc the runtime has); otherwise
``vendor=False`` writes ``requirements.txt`` and ``build.sh``, which fetch wheels for the Lambda platform.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import platform
import re
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradshard
from gradshard.errors import GradshardError
from gradshard.extras import require_extra
from gradshard.runtime.aws_lambda import HANDLER, LAMBDA_MEMORY_MB


@dataclass(frozen=True)
class LambdaRuntime:
    """A Lambda Python runtime: its CPython version and the glibc of the Amazon Linux it runs on."""

    name: str
    python: tuple[int, int]
    glibc: tuple[int, int]
    os: str


LAMBDA_RUNTIMES = {r.name: r for r in (
    LambdaRuntime("python3.11", (3, 11), (2, 26), "Amazon Linux 2"),
    LambdaRuntime("python3.12", (3, 12), (2, 34), "Amazon Linux 2023"),
    LambdaRuntime("python3.13", (3, 13), (2, 34), "Amazon Linux 2023"),
)}
#: The runtime a deployment gets unless told otherwise (library and CLI alike): the pinned numpy's manylinux wheels
#: need a newer glibc than Amazon Linux 2 (python3.11) has.
DEFAULT_RUNTIME = "python3.12"
ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}  # Lambda's name -> platform.machine()
# What the numpy aggregation runtime imports (torch is not deployed), and boto3 for the S3 store's client.
RUNTIME_DISTRIBUTIONS = ("numpy", "safetensors", "xxhash", "blake3", "psutil", "pydantic", "pydantic-core",
                         "annotated-types", "typing-extensions", "typing-inspection", "boto3", "botocore", "s3transfer",
                         "jmespath", "urllib3", "python-dateutil", "six")
MAX_TIMEOUT_S = 900
EPHEMERAL_STORAGE_MB = 512  # the functions stream through the store; /tmp is not used
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed entry timestamps: the same files give the same zip, byte for byte
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


@dataclass(frozen=True)
class AwsDeployment:
    """What :func:`write_aws_deployment` wrote."""

    out_dir: Path
    package: Path
    template: Path
    guide: Path
    requirements: Path | None
    build_script: Path | None
    package_sha256: str
    code_key: str | None  # the S3 key to upload package.zip as; None until build.sh has completed it
    vendored: tuple[str, ...]  # "numpy==2.4.6", ... (pins written to requirements.txt when not vendored)

    @property
    def paths(self) -> list[Path]:
        found = (self.package, self.template, self.guide, self.requirements, self.build_script)
        return [p for p in found if p is not None]


def write_aws_deployment(out_dir: str | os.PathLike[str], *, memory_mb: int = 3008, timeout_s: int = 900,
                         architecture: str = "x86_64", vendor: bool = True, runtime: str = DEFAULT_RUNTIME,
                         check_glibc: bool = True) -> AwsDeployment:
    """Write ``package.zip``, ``template.yaml`` and ``DEPLOY.md`` (and, unvendored, the build files) to ``out_dir``.

    ``check_glibc=False`` vendors wheels whose declared glibc is newer than the runtime's; such a package imports
    on this machine (local emulation) but may not on Lambda.
    """
    _check_options(memory_mb, timeout_s, architecture, runtime)
    target = LAMBDA_RUNTIMES[runtime]
    dists = _distributions()
    if vendor:
        check_vendorable(dists, target, architecture, check_glibc=check_glibc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = dict(_package_files())
    if vendor:
        entries.update(_vendored_files(dists))
    package = out / "package.zip"
    _write_zip(package, entries)
    digest = _sha256(package)
    code_key = f"gradshard/package-{digest[:12]}.zip" if vendor else None
    pins = tuple(f"{d.metadata['Name']}=={d.version}" for d in dists)
    requirements = build_script = None
    if not vendor:
        requirements = _write_text(out / "requirements.txt", "".join(f"{p}\n" for p in pins))
        build_script = _write_text(out / "build.sh", _build_script(target, architecture))
        build_script.chmod(0o755)
    template = _write_text(out / "template.yaml", to_yaml(cloudformation_template(
        memory_mb=memory_mb, timeout_s=timeout_s, architecture=architecture, runtime=runtime, code_key=code_key)))
    guide = _write_text(out / "DEPLOY.md", _guide(target, architecture, memory_mb, timeout_s, code_key, vendor,
                                                  glibc_warnings(dists, target)))
    return AwsDeployment(out, package, template, guide, requirements, build_script, digest, code_key, pins)


def _check_options(memory_mb: int, timeout_s: int, architecture: str, runtime: str) -> None:
    low, high = LAMBDA_MEMORY_MB
    if not low <= memory_mb <= high:
        raise GradshardError(f"Lambda memory must be {low}–{high} MiB, got {memory_mb}")
    if not 1 <= timeout_s <= MAX_TIMEOUT_S:
        raise GradshardError(f"Lambda timeout must be 1–{MAX_TIMEOUT_S} s, got {timeout_s}")
    if architecture not in ARCHITECTURES:
        raise GradshardError(f"unknown Lambda architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    if runtime not in LAMBDA_RUNTIMES:
        raise GradshardError(f"unknown Lambda runtime {runtime!r}; known: {', '.join(LAMBDA_RUNTIMES)}")


def _distributions() -> list[metadata.Distribution]:
    require_extra("s3", "a Lambda deployment (its functions use boto3)")
    dists, missing = [], []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            dists.append(metadata.distribution(name))
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise GradshardError(f"the Lambda runtime needs {', '.join(missing)}, not installed here: pip install them")
    return dists


# --- can this environment's wheels run on Lambda? ----------------------------------------------------------------
def wheel_glibc(dist: metadata.Distribution) -> tuple[int, int] | None:
    """The oldest glibc an installed wheel declares it runs on (its ``WHEEL`` tags); None for a pure-Python wheel.

    A wheel built on this machine (a plain ``linux_*`` tag) is taken to need this machine's glibc.
    """
    tags = [line.partition(":")[2].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    versions = []
    for tag in tags:
        for plat in tag.rsplit("-", 1)[-1].split("."):
            if plat == "any":
                return None
            found = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", plat)
            legacy = _LEGACY_MANYLINUX.get(plat.split("_", 1)[0])
            if found:
                versions.append((int(found[1]), int(found[2])))
            elif legacy is not None:
                versions.append(legacy)
    return min(versions) if versions else _host_glibc()


def _host_glibc() -> tuple[int, int]:
    version = platform.libc_ver()[1] or "0.0"
    major, _, minor = version.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def glibc_warnings(dists: Iterable[metadata.Distribution], target: LambdaRuntime) -> list[str]:
    """One line per installed wheel that declares a newer glibc than ``target``'s Amazon Linux has."""
    lines = []
    for dist in dists:
        need = wheel_glibc(dist)
        if need is not None and need > target.glibc:
            lines.append(f"{dist.metadata['Name']} {dist.version}'s installed wheel needs glibc {need[0]}.{need[1]}; "
                         f"{target.name} on Lambda runs {target.os} with glibc {target.glibc[0]}.{target.glibc[1]}")
    return lines


def check_vendorable(dists: Iterable[metadata.Distribution], target: LambdaRuntime, architecture: str, *,
                     check_glibc: bool = True) -> None:
    """Raise unless this interpreter's installed wheels can run on ``target`` (Linux, CPython, machine, glibc)."""
    here = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    problems = []
    if sys.platform != "linux":
        problems.append(f"this interpreter runs on {sys.platform}, Lambda on Linux")
    if sys.implementation.name != "cpython":
        problems.append(f"this interpreter is {sys.implementation.name}, Lambda runs CPython")
    if sys.version_info[:2] != target.python:
        problems.append(f"this interpreter is {here}, {target.name} is Python {target.python[0]}.{target.python[1]}")
    if platform.machine() != ARCHITECTURES[architecture]:
        problems.append(f"this machine is {platform.machine()}, the function is {architecture}")
    fixes = "use vendor=False (gradshard deploy aws --no-vendor): it writes requirements.txt and build.sh, which " \
            "fetch wheels for the Lambda platform"
    if check_glibc:
        warnings = glibc_warnings(dists, target)
        problems.extend(warnings)
        if warnings:
            fixes += (f"; for these wheels choose a runtime on Amazon Linux 2023 (glibc "
                      f"{LAMBDA_RUNTIMES['python3.12'].glibc[0]}.{LAMBDA_RUNTIMES['python3.12'].glibc[1]}), e.g. "
                      "--runtime python3.12 --no-vendor, or pin versions that ship wheels for the older glibc")
    if problems:
        raise GradshardError(f"cannot vendor this environment's packages for Lambda {target.name} ({architecture}): "
                             + "; ".join(problems) + f". To deploy anyway, {fixes}")


# --- the package -------------------------------------------------------------------------------------------------
def _package_files() -> Iterable[tuple[str, Path]]:
    """gradshard's own files (sources, no bytecode), named as they sit in the zip."""
    root = Path(gradshard.__file__).resolve().parent
    for path in root.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            yield f"gradshard/{path.relative_to(root).as_posix()}", path


def _vendored_files(dists: Iterable[metadata.Distribution]) -> dict[str, Path]:
    """The installed files of ``dists`` (from their RECORD), without bytecode, test suites or scripts."""
    entries: dict[str, Path] = {}
    for dist in dists:
        for file in dist.files or ():
            parts = file.parts
            if parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc" or "tests" in parts[:-1]:
                continue
            source = Path(str(file.locate()))
            if not source.is_file():
                raise GradshardError(f"{dist.metadata['Name']} lists {file} but it is missing; reinstall it")
            entries[file.as_posix()] = source
    return entries


def _write_zip(path: Path, entries: dict[str, Path]) -> None:
    """A deterministic zip (sorted entries, fixed timestamps, 644/755 modes) written under a temporary name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as archive:
            for name in sorted(entries):
                source = entries[name]
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.create_system = 3  # Unix, so the modes below are honoured when Lambda unpacks it
                info.external_attr = (0o100755 if source.stat().st_mode & 0o111 else 0o100644) << 16
                archive.writestr(info, source.read_bytes(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _platform_tags(target: LambdaRuntime, architecture: str) -> list[str]:
    """pip ``--platform`` values for every manylinux level the runtime's glibc supports (pip does not expand)."""
    machine = ARCHITECTURES[architecture]
    minors = range(17, target.glibc[1] + 1)
    return [f"manylinux2014_{machine}", *(f"manylinux_2_{m}_{machine}" for m in minors)]


def _build_script(target: LambdaRuntime, architecture: str) -> str:
    platforms = " ".join(f"--platform {tag}" for tag in _platform_tags(target, architecture))
    version = f"{target.python[0]}.{target.python[1]}"
    return f"""#!/usr/bin/env bash
# Completes package.zip for Lambda {target.name} ({architecture}): adds the wheels pip picks for that platform.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf build && mkdir build
python3 -m zipfile -e package.zip build/
python3 -m pip install --implementation cp --python-version {version} --only-binary=:all: \\
    {platforms} \\
    -t build/ -r requirements.txt
find build -name __pycache__ -type d -prune -exec rm -rf {{}} +
rm -f package.zip && (cd build && python3 -m zipfile -c ../package.zip .)
digest=$(python3 -c "import hashlib; print(hashlib.sha256(open('package.zip', 'rb').read()).hexdigest()[:12])")
echo "package.zip is complete; upload it as CODE_KEY=gradshard/package-$digest.zip"
"""


# --- the CloudFormation template ---------------------------------------------------------------------------------
def cloudformation_template(*, memory_mb: int, timeout_s: int, architecture: str, runtime: str,
                            code_key: str | None) -> dict[str, Any]:
    """A plain CloudFormation template (no SAM transform): data bucket, function role, function."""
    key_default = {} if code_key is None else {"Default": code_key}
    bucket_arn = {"Fn::If": ["CreateDataBucket", {"Fn::GetAtt": ["DataBucket", "Arn"]},
                             {"Fn::Sub": "arn:${AWS::Partition}:s3:::${DataBucketName}"}]}
    objects_arn = {"Fn::If": ["CreateDataBucket", {"Fn::Sub": "${DataBucket.Arn}/*"},
                              {"Fn::Sub": "arn:${AWS::Partition}:s3:::${DataBucketName}/*"}]}
    bucket_name = {"Fn::If": ["CreateDataBucket", {"Ref": "DataBucket"}, {"Ref": "DataBucketName"}]}
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "gradshard aggregation function (numpy runtime) and its S3 data bucket",
        "Parameters": {
            "CodeBucket": {"Type": "String", "Description": "Bucket holding package.zip, in the stack's region"},
            "CodeKey": {"Type": "String", **key_default,
                        "Description": "Key of package.zip in CodeBucket (name it by its content hash)"},
            "MemorySize": {"Type": "Number", "Default": memory_mb, "MinValue": LAMBDA_MEMORY_MB[0],
                           "MaxValue": LAMBDA_MEMORY_MB[1], "Description": "Function memory, MiB"},
            "Timeout": {"Type": "Number", "Default": timeout_s, "MinValue": 1, "MaxValue": MAX_TIMEOUT_S,
                        "Description": "Function timeout, seconds"},
            "DataBucketName": {"Type": "String", "Default": "",
                               "Description": "An existing data bucket to use (another gradshard stack's); "
                                              "empty: create one"},
        },
        "Conditions": {"CreateDataBucket": {"Fn::Equals": [{"Ref": "DataBucketName"}, ""]}},
        "Resources": {
            "DataBucket": {
                "Type": "AWS::S3::Bucket", "Condition": "CreateDataBucket",
                "DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain",
                "Properties": {
                    "PublicAccessBlockConfiguration": {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                                                       "IgnorePublicAcls": True, "RestrictPublicBuckets": True},
                    "BucketEncryption": {"ServerSideEncryptionConfiguration": [
                        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
                    "LifecycleConfiguration": {"Rules": [  # an aggregate whose driver died never completes
                        {"Id": "AbortIncompleteUploads", "Status": "Enabled",
                         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]},
                },
            },
            "FunctionRole": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [
                        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
                         "Action": "sts:AssumeRole"}]},
                    "ManagedPolicyArns": [
                        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"}],
                    "Policies": [{"PolicyName": "gradshard-data-bucket", "PolicyDocument": {
                        "Version": "2012-10-17", "Statement": [
                            {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads"],
                             "Resource": bucket_arn},
                            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                                           "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                             "Resource": objects_arn}]}}],
                },
            },
            "Function": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "Description": "gradshard aggregation functions (invoke contract 1)",
                    "Handler": HANDLER,
                    "Runtime": runtime,
                    "Architectures": [architecture],
                    "MemorySize": {"Ref": "MemorySize"},
                    "Timeout": {"Ref": "Timeout"},
                    "EphemeralStorage": {"Size": EPHEMERAL_STORAGE_MB},
                    "Code": {"S3Bucket": {"Ref": "CodeBucket"}, "S3Key": {"Ref": "CodeKey"}},
                    "Role": {"Fn::GetAtt": ["FunctionRole", "Arn"]},
                },
            },
        },
        "Outputs": {
            "FunctionName": {"Value": {"Ref": "Function"}},
            "FunctionArn": {"Value": {"Fn::GetAtt": ["Function", "Arn"]}},
            "DataBucketName": {"Value": bucket_name},
        },
    }


_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def to_yaml(value: Any) -> str:
    """Block-style YAML of JSON-like data; every string is double-quoted (a JSON string is a valid YAML scalar)."""
    return "\n".join(_yaml_lines(value, "")) + "\n"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"  # only reached for empty ones
    if isinstance(value, bool | int | float | str):
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} to YAML")


def _yaml_lines(value: Any, pad: str) -> list[str]:
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else [(None, v) for v in value]
    for key, item in items:
        lead = "- " if key is None else f"{key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)}: "
        if isinstance(item, dict | list) and item:
            if key is None:  # a list item: its first line follows the dash
                nested = _yaml_lines(item, pad + "  ")
                lines.append(pad + lead + nested[0].lstrip())
                lines.extend(nested[1:])
            else:
                lines.append(pad + lead.rstrip())
                lines.extend(_yaml_lines(item, pad + "  "))
        else:
            lines.append(pad + lead + _yaml_scalar(item))
    return lines


# --- DEPLOY.md ---------------------------------------------------------------------------------------------------
def _guide(target: LambdaRuntime, architecture: str, memory_mb: int, timeout_s: int, code_key: str | None,
           vendor: bool, warnings: list[str]) -> str:
    stack = f"gradshard-{memory_mb}"
    build = "" if vendor else (
        "## 0. Complete the package\n\n"
        "`package.zip` holds gradshard only. `build.sh` adds the wheels pip selects for the Lambda platform\n"
        f"({target.name}, {architecture}) from `requirements.txt` (the versions installed where this was written):\n\n"
        "```sh\n./build.sh\n```\n\nIt prints the completed package's content-addressed key, `CODE_KEY` below.\n\n")
    caveat = "" if not warnings else (
        f"## Warning: wheels newer than {target.name}'s glibc\n\n" + "".join(f"- {w}\n" for w in warnings)
        + f"\nOn {target.os} such a wheel may fail to import, and pip may find no wheel of that version for "
          "this runtime. Prefer a runtime on Amazon Linux 2023 (`--runtime python3.12`, with `--no-vendor` "
          "unless this interpreter is 3.12), or pin older versions.\n\n")
    return f"""# Deploying gradshard to AWS Lambda

Written by `gradshard deploy aws`: runtime {target.name} ({target.os}), {architecture}, {memory_mb} MiB,
{timeout_s} s timeout, handler `{HANDLER}`. Nothing here has been run against AWS by gradshard;
see docs/aws-lambda.md for what was tested locally.

{caveat}{build}## 1. Upload the code

```sh
REGION=us-east-1
CODE_BUCKET=my-code-bucket          # any bucket you own in $REGION
CODE_KEY={code_key or "gradshard/package-<the 12 hex digits build.sh printed>.zip"}
aws s3 cp package.zip "s3://$CODE_BUCKET/$CODE_KEY" --region "$REGION"
```

## 2. Deploy the stack (data bucket, role, function)

```sh
aws cloudformation deploy --region "$REGION" --stack-name {stack} \\
    --template-file template.yaml --capabilities CAPABILITY_IAM \\
    --parameter-overrides CodeBucket="$CODE_BUCKET" CodeKey="$CODE_KEY" MemorySize={memory_mb} Timeout={timeout_s}
aws cloudformation describe-stacks --region "$REGION" --stack-name {stack} \\
    --query "Stacks[0].Outputs" --output table
```

The outputs name the function (`FunctionName`) and the data bucket (`DataBucketName`). Lambda memory belongs
to a function, so invocations that need more than {memory_mb} MiB are refused by the executor: deploy another
stack with a larger `MemorySize` (up to 10240) that shares the data bucket with
`DataBucketName=<the first stack's bucket>`.

## 3. Run a round

The round's client updates must be in an S3 store inside the data bucket (gradshard's S3 store,
`s3://<DataBucketName>/<prefix>`); then, with credentials that may invoke the function:

```python
from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.runtime.aws_lambda import LambdaExecutor
from gradshard.store import open_store

store = open_store("s3://<DataBucketName>/rounds-demo")
executor = LambdaExecutor("<FunctionName>", region="us-east-1", workers=16)  # memory read from the function
result = aggregate_round(store, 0, executor, AggregateConfig(topology="sharded", shards=8))
print(result.summary())
```

## Removing it

```sh
aws cloudformation delete-stack --region "$REGION" --stack-name {stack}
```

The data bucket is retained (DeletionPolicy Retain): empty and delete it yourself when its rounds are no longer
needed.
"""
