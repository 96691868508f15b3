"""The whole system on AWS, shaped for AWS SAM: clients, aggregation and server functions from one container image,
the data bucket, least-privilege roles, log retention, sample events and a guide (``gradshard deploy sam``).

Nothing here talks to AWS. The template is emitted with PyYAML and checked with cfn-lint (the tests); what the roles
allow is checked by evaluating their policy documents (``tests/test_sam_deployment.py``).

Roles, over the store's prefix ``P`` in the data bucket:

- **clients** (``ClientFunction``) have no access to the data at all: each client task carries URLs the driver
  presigned for it (``gradshard train --executor lambda`` does so on an S3 store): a GET of each object it reads (its
  data, the global model) and a PUT of its own update key, valid for the round's deadline. So a client can read
  nothing else and write nothing but its own update — what IAM alone cannot give, since it cannot tell one
  invocation of a function from another. (The role may record consumed invocation tokens, ``P/security/jti/*``.)
- **aggregation and server functions** (``AggregationFunction``) may read the store and write everything under it
  but the clients' updates (an explicit deny on ``P/rounds/*/updates/*``).
- **the driver** (``DriverPolicy``, a managed policy to attach to whoever runs ``gradshard train``) may invoke the two
  functions, read their configuration, and read, write and list the store's prefix.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from gradshard.deploy.aws import EPHEMERAL_STORAGE_MB, MAX_TIMEOUT_S
from gradshard.errors import GradshardError
from gradshard.runtime.aws_lambda import HANDLER, LAMBDA_MEMORY_MB

TORCH_PIN = "torch==2.13.0"
IMAGE_EXTRAS = ("train", "s3", "privacy")  # what the functions of a training run import
BASE_IMAGE = "public.ecr.aws/lambda/python:3.11"


@dataclass(frozen=True)
class SamDeployment:
    """What :func:`write_sam_deployment` wrote."""

    out_dir: Path
    files: tuple[str, ...]


def _arn(path: str) -> dict[str, str]:
    return {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::${{DataBucket}}/${{StorePrefix}}{path}"}


def sam_template(*, memory_mb: int, client_memory_mb: int, timeout_s: int, architecture: str = "x86_64",
                 log_retention_days: int = 14, rounds_ttl_days: int = 30) -> dict[str, Any]:
    """The SAM template (a dict, YAML-ready)."""
    for name, value in (("memory", memory_mb), ("client memory", client_memory_mb)):
        if not LAMBDA_MEMORY_MB[0] <= value <= LAMBDA_MEMORY_MB[1]:
            raise GradshardError(f"Lambda {name} must be {LAMBDA_MEMORY_MB[0]}–{LAMBDA_MEMORY_MB[1]} MiB, got {value}")
    if not 1 <= timeout_s <= MAX_TIMEOUT_S:
        raise GradshardError(f"Lambda timeout must be 1–{MAX_TIMEOUT_S} s, got {timeout_s}")
    bucket_arn = {"Fn::Sub": "arn:${AWS::Partition}:s3:::${DataBucket}"}
    function_props = {"PackageType": "Image", "ImageUri": {"Ref": "ImageUri"}, "Architectures": [architecture],
                      "Timeout": {"Ref": "Timeout"}, "EphemeralStorage": {"Size": EPHEMERAL_STORAGE_MB},
                      "ImageConfig": {"Command": [HANDLER]}}
    updates = _arn("rounds/*/updates/*")
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": "gradshard: federated training with clients, aggregation and server steps as Lambda functions",
        "Parameters": {
            "ImageUri": {"Type": "String", "Description": "The gradshard image in ECR (sam build pushes it)"},
            "StorePrefix": {"Type": "String", "Default": "gradshard/", "AllowedPattern": "^([A-Za-z0-9._-]+/)*$",
                            "Description": "Prefix of the store in the data bucket (empty, or ending in /)"},
            "MemorySize": {"Type": "Number", "Default": memory_mb, "MinValue": LAMBDA_MEMORY_MB[0],
                           "MaxValue": LAMBDA_MEMORY_MB[1], "Description": "Aggregation and server functions, MiB"},
            "ClientMemorySize": {"Type": "Number", "Default": client_memory_mb, "MinValue": LAMBDA_MEMORY_MB[0],
                                 "MaxValue": LAMBDA_MEMORY_MB[1], "Description": "Client functions, MiB"},
            "Timeout": {"Type": "Number", "Default": timeout_s, "MinValue": 1, "MaxValue": MAX_TIMEOUT_S},
            "ClientConcurrency": {"Type": "Number", "Default": 0, "MinValue": 0,
                                  "Description": "Concurrency reserved for the clients (0: unreserved)"},
            "LogRetentionDays": {"Type": "Number", "Default": log_retention_days,
                                 "AllowedValues": [1, 3, 5, 7, 14, 30, 60, 90, 180, 365]},
            "RoundsRetentionDays": {"Type": "Number", "Default": rounds_ttl_days, "MinValue": 1,
                                    "Description": "Round objects (updates, aggregates) expire after this many days"},
        },
        "Conditions": {"ReserveClients": {"Fn::Not": [{"Fn::Equals": [{"Ref": "ClientConcurrency"}, 0]}]}},
        "Resources": {
            "DataBucket": {
                "Type": "AWS::S3::Bucket", "DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain",
                "Properties": {
                    "PublicAccessBlockConfiguration": {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                                                       "IgnorePublicAcls": True, "RestrictPublicBuckets": True},
                    "BucketEncryption": {"ServerSideEncryptionConfiguration": [
                        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
                    "LifecycleConfiguration": {"Rules": [
                        {"Id": "AbortIncompleteUploads", "Status": "Enabled",
                         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
                        {"Id": "ExpireOldRounds", "Status": "Enabled",
                         "Prefix": {"Fn::Sub": "${StorePrefix}rounds/"},
                         "ExpirationInDays": {"Ref": "RoundsRetentionDays"}}]},
                },
            },
            "ClientFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    **function_props, "Description": "gradshard client training (train_client)",
                    "MemorySize": {"Ref": "ClientMemorySize"},
                    "ReservedConcurrentExecutions": {"Fn::If": ["ReserveClients", {"Ref": "ClientConcurrency"},
                                                                {"Ref": "AWS::NoValue"}]},
                    # No access to the data: a client reads and writes through the URLs the driver presigns for
                    # its task (its data, the model, its own update key). Only scoped tokens' records are written.
                    "Policies": [{"Version": "2012-10-17", "Statement": [
                        {"Sid": "ConsumeTokens", "Effect": "Allow", "Action": ["s3:PutObject"],
                         "Resource": [_arn("security/jti/*")]}]}],
                },
                "Metadata": {"DockerTag": "gradshard", "DockerContext": ".", "Dockerfile": "Dockerfile"},
            },
            "AggregationFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    **function_props, "Description": "gradshard aggregation and server functions",
                    "MemorySize": {"Ref": "MemorySize"},
                    "Policies": [{"Version": "2012-10-17", "Statement": [
                        {"Sid": "ReadStore", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [_arn("*")]},
                        {"Sid": "WriteStore", "Effect": "Allow",
                         "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                         "Resource": [_arn("*")]},
                        {"Sid": "NeverTheClientsUpdates", "Effect": "Deny", "Action": ["s3:PutObject"],
                         "Resource": [updates]}]}],
                },
                "Metadata": {"DockerTag": "gradshard", "DockerContext": ".", "Dockerfile": "Dockerfile"},
            },
            "ClientLogs": {"Type": "AWS::Logs::LogGroup", "Properties": {
                "LogGroupName": {"Fn::Sub": "/aws/lambda/${ClientFunction}"},
                "RetentionInDays": {"Ref": "LogRetentionDays"}}},
            "AggregationLogs": {"Type": "AWS::Logs::LogGroup", "Properties": {
                "LogGroupName": {"Fn::Sub": "/aws/lambda/${AggregationFunction}"},
                "RetentionInDays": {"Ref": "LogRetentionDays"}}},
            "DriverPolicy": {
                "Type": "AWS::IAM::ManagedPolicy",
                "Properties": {
                    "Description": "Attach to whoever runs gradshard train against this stack",
                    "PolicyDocument": {"Version": "2012-10-17", "Statement": [
                        {"Sid": "InvokeFunctions", "Effect": "Allow",
                         "Action": ["lambda:InvokeFunction", "lambda:GetFunctionConfiguration"],
                         "Resource": [{"Fn::GetAtt": ["ClientFunction", "Arn"]},
                                      {"Fn::GetAtt": ["AggregationFunction", "Arn"]}]},
                        {"Sid": "UseStore", "Effect": "Allow",
                         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                                    "s3:ListMultipartUploadParts"],
                         "Resource": [_arn("*")]},
                        {"Sid": "ListStore", "Effect": "Allow",
                         "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads"], "Resource": [bucket_arn],
                         "Condition": {"StringLike": {"s3:prefix": [{"Fn::Sub": "${StorePrefix}*"}]}}}]},
                },
            },
        },
        "Outputs": {
            "ClientFunctionName": {"Value": {"Ref": "ClientFunction"}},
            "AggregationFunctionName": {"Value": {"Ref": "AggregationFunction"}},
            "DataBucketName": {"Value": {"Ref": "DataBucket"}},
            "DriverPolicyArn": {"Value": {"Ref": "DriverPolicy"}},
        },
    }


@dataclass(frozen=True)
class PlannedMemory:
    """The aggregation function's memory from the cost planner, and the plan behind it."""

    memory_mb: int
    shards: int
    per_1000_rounds: float
    layout: str


def planned_memory(params: int, clients: int) -> PlannedMemory:
    """The memory of the cheapest feasible GradsSharding plan (any M, either object layout) for a model of
    ``params`` float32 parameters and ``clients`` clients, rounded up to Lambda's grid (1 MiB, at least 128)."""
    from gradshard.cost.planner import PlanRequest, recommend

    request = PlanRequest(params=params, clients=clients)
    sharded = [c for c in recommend(request).alternatives
               if c.cost.shape.arch == "sharded" and c.feasibility.feasible]
    if not sharded:
        raise GradshardError(f"no GradsSharding plan fits Lambda for {params:,} parameters and {clients} clients")
    best = min(sharded, key=lambda c: (c.per_1000_total, c.cost.latency_s))
    memory = min(LAMBDA_MEMORY_MB[1], max(LAMBDA_MEMORY_MB[0], math.ceil(best.cost.memory_mb)))
    return PlannedMemory(memory, best.cost.shape.shards, best.per_1000_total, best.cost.options.layout)


def to_yaml(template: dict[str, Any]) -> str:
    """The template as YAML (PyYAML, block style, keys in order)."""
    return str(yaml.safe_dump(template, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True))


def dockerfile() -> str:
    return f"""# gradshard's Lambda image: client, aggregation and server functions (one handler: the invoke contract)
FROM {BASE_IMAGE}
# torch first, from the CPU index, so pip does not pull a multi-GB CUDA build
RUN pip install --no-cache-dir {TORCH_PIN} --index-url https://download.pytorch.org/whl/cpu
COPY requirements.txt ${{LAMBDA_TASK_ROOT}}/
RUN pip install --no-cache-dir -r ${{LAMBDA_TASK_ROOT}}/requirements.txt
COPY gradshard/ ${{LAMBDA_TASK_ROOT}}/gradshard/
CMD ["{HANDLER}"]
"""


def sample_events() -> dict[str, dict[str, Any]]:
    """Events to try the deployed functions with (``sam local invoke`` or the console)."""
    return {"noop.json": {"contract": 1, "invocation": "smoke-noop", "function": "noop", "args": {},
                          "store": {"kind": "s3", "bucket": "<DataBucketName>", "prefix": "gradshard"}}}


def _requirements() -> str:
    """gradshard's own requirements and the extras of :data:`IMAGE_EXTRAS`, pinned to the versions installed here (torch
    excluded: the Dockerfile installs it first, from the CPU index)."""
    pins = set()
    for requirement in metadata.requires("gradshard") or []:
        name, _, marker = requirement.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([a-z0-9_-]+)['\"]", marker)
        if marker and (extra is None or extra.group(1) not in IMAGE_EXTRAS):
            continue
        project = re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0]
        if project.lower() == "torch":
            continue
        try:
            pins.add(f"{project}=={metadata.version(project)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(sorted(pins, key=str.lower)) + "\n"


def write_sam_deployment(out_dir: str | os.PathLike[str], *, memory_mb: int = 3008, client_memory_mb: int = 3008,
                         timeout_s: int = 900, architecture: str = "x86_64", plan: PlannedMemory | None = None
                         ) -> SamDeployment:
    """Write ``template.yaml``, ``Dockerfile``, ``requirements.txt``, ``gradshard/`` (the package), ``events/`` and
    ``DEPLOY.md`` into ``out_dir``; with ``plan``, the aggregation memory is the planner's."""
    if plan is not None:
        memory_mb = plan.memory_mb
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = sam_template(memory_mb=memory_mb, client_memory_mb=client_memory_mb, timeout_s=timeout_s,
                            architecture=architecture)
    (out / "template.yaml").write_text(to_yaml(template))
    (out / "Dockerfile").write_text(dockerfile())
    (out / "requirements.txt").write_text(_requirements())
    package = Path(__file__).resolve().parents[1]
    shutil.rmtree(out / "gradshard", ignore_errors=True)
    shutil.copytree(package, out / "gradshard", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "events").mkdir(exist_ok=True)
    for name, event in sample_events().items():
        (out / "events" / name).write_text(json.dumps(event, indent=1) + "\n")
    (out / "DEPLOY.md").write_text(guide(memory_mb, client_memory_mb, timeout_s, plan))
    files = ("template.yaml", "Dockerfile", "requirements.txt", "gradshard/", "events/noop.json", "DEPLOY.md")
    return SamDeployment(out, files)


def guide(memory_mb: int, client_memory_mb: int, timeout_s: int, plan: PlannedMemory | None = None) -> str:
    planned = "" if plan is None else (
        f"\nThe aggregation function's {memory_mb} MiB come from gradshard's cost planner: GradsSharding with "
        f"M = {plan.shards} ({plan.layout} objects), predicted ${plan.per_1000_rounds:.2f} per 1000 rounds; run "
        f"`--shards {plan.shards}` to match it.\n")
    return f"""# Deploying gradshard with AWS SAM

Written by `gradshard deploy sam`: one container image (`Dockerfile`: the Lambda Python 3.11 base image,
{TORCH_PIN} from the CPU index, the pinned `requirements.txt`, gradshard) serving two functions — `ClientFunction`
({client_memory_mb} MiB: client training) and `AggregationFunction` ({memory_mb} MiB: shard and server functions) —
{timeout_s} s timeout, a data bucket with lifecycle rules, least-privilege roles, log groups with retention, and
`DriverPolicy` for whoever runs the driver. Nothing here has been run against AWS by gradshard; see
docs/aws-lambda.md for what was tested locally.
{planned}
## 1. Build and deploy

```sh
sam validate --lint
sam build
sam deploy --guided          # creates an ECR repository for the image; answer the parameters
aws cloudformation describe-stacks --stack-name <stack> --query "Stacks[0].Outputs" --output table
```

Attach the output `DriverPolicyArn` to the user or role that will run the driver.

## 2. Smoke test

```sh
sam remote invoke AggregationFunction --stack-name <stack> --event-file events/noop.json
```

(Replace `<DataBucketName>` in the event with the output's bucket first.) A response with `"ok": true` means the
image, the handler and the invoke contract work.

## 3. Train

```sh
gradshard train --store s3://<DataBucketName>/gradshard --executor lambda \\
    --lambda-function <AggregationFunctionName> --lambda-client-function <ClientFunctionName> \\
    --region <region> --rounds 20
```

## Quotas and costs to know

- Account concurrency: 1,000 concurrent executions by default per region; `ClientConcurrency` reserves some for the
  clients (the rest of the account loses them). A round runs `--workers` invocations at once.
- Memory: up to 10,240 MiB per function; invocations that need more than a function has are refused by the executor
  before any call.
- Logs are kept `LogRetentionDays` (14 by default); round objects expire after `RoundsRetentionDays` (30).
- The data bucket is retained when the stack is deleted: empty and delete it yourself.

## What the roles allow

Clients have no access to the data bucket: each client task carries URLs the driver presigned for it (a GET of each
object it reads, a PUT of its own update key, valid for the round's deadline), so a client cannot read another's
update, write a model, or write any update but its own. Aggregation and server functions may read and write the
store but never the clients' updates. The driver needs `DriverPolicy`.
"""
