"""AWS Lambda: the invoke contract, its handler, and an executor that invokes a deployed function.

The contract is versioned JSON. The event is ``{"contract": 1, "invocation", "function", "args", "store"}`` and,
when the executor has ``tokens``, the attempt's invocation token as the top-level field ``"token"`` (a function
deployed with ``GRADSHARD_TOKEN_PUBLIC_KEY`` in its environment refuses events without a valid one); the
response is what a local worker returns (``ok, result, error_type, error, client, reason, duration_s, io,
peak_rss_bytes``) plus ``request_id`` and ``memory_limit_mb`` from the Lambda context. The handler runs exactly
what a :class:`~gradshard.runtime.local.LocalExecutor` worker runs (:func:`gradshard.runtime.worker.execute`), so a
function behaves the same on both. Only :class:`LambdaExecutor` needs boto3, and it imports it when constructed:
importing this module (the handler's cold start) loads neither boto3 nor torch.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradshard.errors import GradshardError, StoreError
from gradshard.extras import require_extra
from gradshard.runtime import registry, worker
from gradshard.runtime.executor import Executor
from gradshard.runtime.report import InvocationReport
from gradshard.security.tokens import TokenIssuer
from gradshard.store import Store
from gradshard.topology.base import Invocation
from gradshard.units import MIB

log = logging.getLogger(__name__)

CONTRACT: Final = 1
HANDLER = "gradshard.runtime.aws_lambda.handler"
LAMBDA_MEMORY_MB = (128, 10240)  # the memory sizes Lambda accepts, MiB
MAX_PAYLOAD_BYTES = 6 * MIB  # Lambda's limit on a synchronous invocation's request and response
# Resident memory of a function before it does anything: the Python runtime, numpy, pydantic and gradshard
# loaded. A noop peaked at 49 MiB here through the local Invoke-API emulator (docs/aws-lambda.md); Lambda's
# runtime client adds its own, so the default keeps a margin. Measure on a real function and pass baseline_mb.
DEFAULT_BASELINE_MB = 128.0
# Client errors that fail again however often they are retried (named in the report's message).
_HINTS = {
    "ResourceNotFoundException": "check the function name and region, or deploy it (gradshard deploy aws)",
    "AccessDeniedException": "the caller needs lambda:InvokeFunction on the function",
    "AccessDenied": "the caller needs lambda:InvokeFunction on the function",
    "TooManyRequestsException": "throttled after botocore's retries: lower workers or raise the function's "
                                "concurrency limit",
    "RequestTooLargeException": f"the event is over Lambda's {MAX_PAYLOAD_BYTES // MIB} MiB limit",
}


class InvokeEvent(BaseModel):
    """The event one invocation sends to the function (contract version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    contract: Literal[1]
    invocation: str = Field(min_length=1)
    function: str = Field(min_length=1)
    module: str = ""  # the module registering the function (imported if needed, trusted packages only)
    args: dict[str, Any]
    store: dict[str, Any]
    token: str | None = Field(default=None, max_length=8192)  # the attempt's invocation token (tokens on)


class InvokeResponse(BaseModel):
    """What the function returns: a worker's report payload and the Lambda context's request id and memory."""

    model_config = ConfigDict(extra="ignore")

    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None
    client: str | None = None
    reason: str | None = None
    bad_clients: dict[str, str] = Field(default_factory=dict)
    duration_s: float = 0.0
    io: dict[str, int] = Field(default_factory=dict)
    peak_rss_bytes: int | None = None
    request_id: str | None = None
    memory_limit_mb: int | None = None


def invoke_event(invocation: Invocation, store_spec: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """The contract's event for ``invocation`` against the store described by ``store_spec``; ``token`` is left
    out when None, so an event without tokens is what functions deployed before tokens accept."""
    event = InvokeEvent(contract=CONTRACT, invocation=invocation.id, function=invocation.function,
                        module=invocation.module, args=invocation.payload(), store=store_spec,
                        token=token).model_dump()
    if token is None:
        del event["token"]
    return event


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One line naming every bad field, e.g. ``field 'contract': Input should be 1``."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        given = error.get("input")
        got = f" (got {given!r:.80})" if isinstance(given, str | int | float) else ""
        problems.append(f"{f'field {field!r}' if field else f'the {what}'}: {error['msg']}{got}")
    return f"invalid {what} (contract {CONTRACT}): " + "; ".join(problems)


def _context_fields(context: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    request_id = getattr(context, "aws_request_id", None)
    if request_id is not None:
        fields["request_id"] = str(request_id)
    memory = getattr(context, "memory_limit_in_mb", None)  # a string in Lambda's Python runtime
    if memory is not None:
        fields["memory_limit_mb"] = int(memory)
    return fields


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """The Lambda entry point (``gradshard.runtime.aws_lambda.handler``): run one invocation of the contract.

    Never raises: a bad event, an unknown function or the function's own failure comes back as a payload with
    ``ok: false``, ``error_type`` and ``error`` (a bad event's ``error`` names each bad field).
    """
    try:
        request = InvokeEvent.model_validate(event)
    except ValidationError as exc:
        payload = _refused(describe_validation_error(exc, "invoke event"))
    else:
        try:
            registry.resolve(request.function, request.module)
        except (GradshardError, ImportError) as exc:
            payload = _refused(f"invalid invoke event (contract {CONTRACT}): field 'function': {exc}")
        else:
            payload = worker.execute(request.function, request.args, request.store, request.module, request.token)
    payload.update(_context_fields(context))
    return payload


def _refused(message: str) -> dict[str, Any]:
    return {"ok": False, "error_type": "ValidationError", "error": message, "duration_s": 0.0, "io": {}}


def lambda_client(*, region: str | None = None, endpoint_url: str | None = None, timeout_s: float = 900.0,
                  max_connections: int = 10) -> Any:
    """A boto3 Lambda client that retries throttling (standard mode) and waits longer than a function runs."""
    require_extra("s3", "the AWS Lambda executor")
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 4}, connect_timeout=10,
                    read_timeout=timeout_s + 60, max_pool_connections=max(10, max_connections),
                    tcp_keepalive=True)
    return boto3.client("lambda", region_name=region, endpoint_url=endpoint_url, config=config)


def function_memory_mb(client: Any, function_name: str) -> int:
    """The memory a deployed function has (``MemorySize`` of its configuration), MiB."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        configuration = client.get_function_configuration(FunctionName=function_name)
    except (BotoCoreError, ClientError) as exc:
        raise GradshardError(f"cannot read the configuration of Lambda function {function_name!r}: {exc}; pass "
                             "memory_mb, or check the name, region and credentials") from exc
    return int(configuration["MemorySize"])


class LambdaExecutor(Executor):
    """Runs each invocation as one synchronous call of a deployed Lambda function (the invoke contract).

    Lambda memory is a property of the function, not of a call: invocations whose need plus ``baseline_mb``
    exceeds the function's ``memory_mb`` are refused at once (``MemoryLimitError``, not retried) — deploy another
    function with more memory for them. Stores must be reachable from Lambda (S3): the in-memory store never is,
    a local directory only with ``allow_local_store=True``, which exists for local emulation.
    """

    def __init__(self, function_name: str, *, region: str | None = None, endpoint_url: str | None = None,
                 memory_mb: int | None = None, workers: int = 8, retries: int = 2, timeout_s: float = 900.0,
                 baseline_mb: float = DEFAULT_BASELINE_MB, allow_local_store: bool = False,
                 client: Any = None, tokens: TokenIssuer | None = None) -> None:
        if client is None:
            client = lambda_client(region=region, endpoint_url=endpoint_url, timeout_s=timeout_s,
                                   max_connections=workers)
        if memory_mb is None:
            memory_mb = function_memory_mb(client, function_name)
        low, high = LAMBDA_MEMORY_MB
        if not low <= memory_mb <= high:
            raise GradshardError(f"Lambda memory must be {low}–{high} MiB, got {memory_mb} for {function_name!r}")
        super().__init__(workers=workers, retries=retries, memory_cap_bytes=memory_mb * MIB, timeout_s=timeout_s,
                         tokens=tokens)
        self.function_name = function_name
        self.memory_mb = memory_mb
        self.baseline_bytes = int(baseline_mb * MIB)
        self.allow_local_store = allow_local_store
        self.client = client

    def refusal(self, invocation: Invocation, store: Store) -> tuple[str, str] | None:
        """Why ``invocation`` cannot run on this function, as (error type, message), or None if it can."""
        need = invocation.memory_bytes + self.baseline_bytes
        if need > self.memory_mb * MIB:
            size = min(LAMBDA_MEMORY_MB[1], max(LAMBDA_MEMORY_MB[0], math.ceil(need / MIB)))
            return ("MemoryLimitError",
                    f"invocation {invocation.id} needs {need / MIB:.0f} MiB ({invocation.memory_bytes / MIB:.0f} "
                    f"MiB + {self.baseline_bytes / MIB:.0f} MiB baseline), more than Lambda function "
                    f"{self.function_name!r} has ({self.memory_mb} MiB): run it on a function with at least "
                    f"{size} MiB (Lambda allows up to {LAMBDA_MEMORY_MB[1]}), or plan with more shards")
        try:
            spec = store.spec()
        except StoreError as exc:
            return "PlanError", f"a Lambda function cannot reach this store: {exc}"
        for where, target in (("store", spec), ("node store", getattr(invocation.args, "node_store", None))):
            if isinstance(target, dict) and not self._reachable(target):
                return ("PlanError",
                        f"invocation {invocation.id}: Lambda function {self.function_name!r} cannot reach the "
                        f"{where} {target}: use an S3 store on AWS (a local directory or a loopback endpoint works "
                        "only in local emulation, allow_local_store=True)")
        return None

    def _reachable(self, spec: dict[str, Any]) -> bool:
        kind = spec.get("kind")
        if kind == "memory":
            return False
        if kind == "local" or _is_loopback(spec.get("endpoint_url")):
            return self.allow_local_store
        return True

    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        started = time.perf_counter()
        failure = self.refusal(invocation, store)
        payload: dict[str, Any] | None = None
        if failure is None:
            payload, failure = self._invoke(invocation, store, token)
        return self._report(invocation, payload, failure, time.perf_counter() - started)

    def _invoke(self, invocation: Invocation, store: Store,
                token: str | None = None) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
        """Call the function once: (response payload, None) or (None, (error type, message))."""
        from botocore.exceptions import BotoCoreError, ClientError

        event = json.dumps(invoke_event(invocation, store.spec(), token)).encode()
        if len(event) > MAX_PAYLOAD_BYTES:
            return None, ("PlanError", f"invocation {invocation.id}'s event is {len(event)} bytes, over Lambda's "
                                       f"{MAX_PAYLOAD_BYTES} byte limit")
        where = f"Lambda function {self.function_name!r} (invocation {invocation.id})"
        try:
            response = self.client.invoke(FunctionName=self.function_name, InvocationType="RequestResponse",
                                          Payload=event)
            raw = response["Payload"].read()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "ClientError"))
            hint = _HINTS.get(code)
            return None, (code, f"invoking {where} failed: {code}: {error.get('Message', exc)}"
                                + (f" ({hint})" if hint else ""))
        except BotoCoreError as exc:
            return None, (type(exc).__name__, f"invoking {where} failed: {exc}")
        request_id = response.get("ResponseMetadata", {}).get("RequestId")
        function_error = response.get("FunctionError")
        if function_error:
            return None, ("LambdaFunctionError", f"{where} failed ({function_error}, request {request_id}): "
                                                 f"{_lambda_error(raw)}")
        try:
            payload = InvokeResponse.model_validate_json(raw).model_dump()
        except ValidationError as exc:
            return None, ("ValidationError", f"{where} answered outside the invoke contract: "
                                             f"{describe_validation_error(exc, 'response')}; redeploy the function")
        log.debug("%s ran as request %s", where, request_id)
        return payload, None

    def _report(self, invocation: Invocation, payload: dict[str, Any] | None, failure: tuple[str, str] | None,
                wall: float) -> InvocationReport:
        cap = self.memory_mb * MIB
        fields: dict[str, Any] = {"invocation": invocation.id, "function": invocation.function, "ok": False,
                                  "duration_s": wall, "wall_s": wall}
        if failure is not None or payload is None:
            error_type, error = failure or ("WorkerCrash", f"invocation {invocation.id} returned no payload")
            fields.update(error_type=error_type, error=error, memory_cap_bytes=cap)
            return InvocationReport.model_validate(fields)
        io = payload.pop("io")
        payload.pop("request_id")
        memory_limit_mb = payload.pop("memory_limit_mb")
        if memory_limit_mb is not None:  # the function's memory as it ran (it may have been reconfigured)
            cap = memory_limit_mb * MIB
        fields.update(payload, **io, memory_cap_bytes=cap)
        peak = fields["peak_rss_bytes"]
        if fields["ok"] and peak is not None and peak > cap:
            fields.update(ok=False, error_type="MemoryLimitError",
                          error=f"invocation {invocation.id} exceeded its function's memory: peak resident "
                                f"{peak / MIB:.1f} MiB > {cap / MIB:.0f} MiB")
        return InvocationReport.model_validate(fields)


def _is_loopback(url: Any) -> bool:
    """Whether ``url`` points at this machine (an S3 endpoint a Lambda function cannot reach)."""
    if not isinstance(url, str) or not url:
        return False
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _lambda_error(raw: bytes) -> str:
    """``errorType: errorMessage`` of a function error's payload (Lambda's own JSON), or the raw text."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500] or "(no payload)"
    if not isinstance(body, dict):
        return str(body)[:500]
    return f"{body.get('errorType', 'Error')}: {body.get('errorMessage', '')}".strip()
