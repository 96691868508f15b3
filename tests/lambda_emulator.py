"""A local emulator of the AWS Lambda Invoke API, for testing gradshard's Lambda handler and executor.

It serves the two calls :class:`~gradshard.runtime.aws_lambda.LambdaExecutor` makes, on 127.0.0.1 and a free port:
``GET /2015-03-31/functions/{name}/configuration`` and ``POST /2015-03-31/functions/{name}/invocations``. Each
invocation runs the deployed handler in a fresh interpreter (``python -I -S``: no site-packages, no environment)
whose ``sys.path`` is the unzipped package plus the standard library, so a passing run proves the package is
self-contained (an ``image`` function — a container image, which has torch — keeps the interpreter's installed
libraries as its own); after the handler returns, the interpreter checks that every module it loaded came from those
two places. Like Lambda, it gives the function only its name, memory, credentials and region as environment.
A process that dies or outlives the function's timeout is answered as Lambda does, with
``X-Amz-Function-Error: Unhandled``. Not emulated: authentication, concurrency limits, throttling, cold-start
reuse (every invocation here is a cold start), and any memory limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

API = "/2015-03-31/functions/"
ACCOUNT = "123456789012"
HANDLER = "gradshard.runtime.aws_lambda.handler"
_FORWARDED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")

# Runs in the isolated interpreter: argv = [package dir, function name, memory MiB, timeout s, request id].
BOOTSTRAP = r"""
import importlib, json, sys, sysconfig, time
package, name, memory, timeout, request_id = sys.argv[1:6]
sys.path.insert(0, package)
deadline = time.monotonic() + float(timeout)

class Context:
    function_name = name
    memory_limit_in_mb = memory
    aws_request_id = request_id
    def get_remaining_time_in_millis(self):
        return int(max(0.0, deadline - time.monotonic()) * 1000)

module, _, attr = sys.argv[6].rpartition(".")
handler = getattr(importlib.import_module(module), attr)
response = handler(json.loads(sys.stdin.buffer.read()), Context())
roots = (package, sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"))
if not sys.flags.no_site:  # a container-image function: its installed libraries are part of it
    roots += (sysconfig.get_path("purelib"), sysconfig.get_path("platlib"))
strays = sorted(m for m, mod in list(sys.modules.items())  # (torch.ops and torch.classes have no real file)
                if isinstance(getattr(mod, "__file__", None), str) and mod.__file__.startswith("/")
                and not mod.__file__.startswith(roots))
if strays:
    sys.stderr.write(f"modules loaded from outside the package: {strays}\n")
    sys.exit(9)
sys.stdout.write(json.dumps(response))
"""


@dataclass
class Function:
    """A deployed function: its unzipped package and configuration."""

    name: str
    package_dir: Path
    memory_mb: int = 3008
    timeout_s: float = 900.0
    handler: str = HANDLER
    interpreter: str = sys.executable  # the runtime's Python (e.g. a CPython 3.12 for a python3.12 package)
    # A container-image function: the interpreter's installed libraries are the image's (torch and all); the
    # package directory is where gradshard itself lives. Modules may then come from site-packages too.
    image: bool = False
    credentials: bool = True  # whether the function's role credentials reach it (False: a role with no permission)


@dataclass
class Call:
    """One emulated invocation, for assertions and timing."""

    function: str
    request_id: str
    wall_s: float
    status: str  # "ok" or the Unhandled error type


@dataclass
class LambdaEmulator:
    """The Invoke API for ``functions`` on 127.0.0.1; use as a context manager."""

    functions: dict[str, Function]
    calls: list[Call] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "the emulator is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LambdaEmulator:
        emulator = self

        class Handler(_Handler):
            pass

        Handler.emulator = emulator
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def invoke(self, function: Function, event: bytes) -> tuple[int, dict[str, str], bytes]:
        """Run ``function`` on ``event`` in a fresh isolated interpreter: (status, headers, body)."""
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        isolation = ["-I", "-B"] if function.image else ["-I", "-S", "-B"]
        command = [function.interpreter, *isolation, "-c", BOOTSTRAP, str(function.package_dir), function.name,
                   str(function.memory_mb), str(function.timeout_s), request_id, function.handler]
        headers = {"X-Amz-Executed-Version": "$LATEST", "x-amzn-RequestId": request_id}
        try:
            done = subprocess.run(command, input=event, capture_output=True, timeout=function.timeout_s,
                                  env=_function_env(function), check=False)
        except subprocess.TimeoutExpired:
            error = {"errorType": "Sandbox.Timedout",
                     "errorMessage": f"RequestId: {request_id} Error: Task timed out after "
                                     f"{function.timeout_s:.2f} seconds"}
        else:
            if done.returncode == 0:
                self.calls.append(Call(function.name, request_id, time.perf_counter() - started, "ok"))
                return 200, headers, done.stdout
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            error = {"errorType": "Runtime.ExitError",
                     "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: exit status "
                                     f"{done.returncode} {tail[0]}".rstrip()}
        self.calls.append(Call(function.name, request_id, time.perf_counter() - started, error["errorType"]))
        headers["X-Amz-Function-Error"] = "Unhandled"
        return 200, headers, json.dumps(error).encode()


def _function_env(function: Function) -> dict[str, str]:
    """The environment Lambda gives a function: its name and memory, and the (role's) credentials and region."""
    env = {name: os.environ[name] for name in _FORWARDED if name in os.environ
           and (function.credentials or not name.startswith("AWS_") or name.endswith("REGION"))}
    env.update(AWS_LAMBDA_FUNCTION_NAME=function.name, AWS_LAMBDA_FUNCTION_MEMORY_SIZE=str(function.memory_mb),
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


class _Handler(BaseHTTPRequestHandler):
    emulator: LambdaEmulator

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _function(self, suffix: str) -> Function | None:
        path = self.path.split("?", 1)[0]
        if not (path.startswith(API) and path.endswith(suffix)):
            self._send(404, {"x-amzn-ErrorType": "UnknownOperationException"}, {"message": f"no route {path}"})
            return None
        name = unquote(path[len(API):-len(suffix)])
        function = self.emulator.functions.get(name.rsplit(":", 1)[-1])
        if function is None:
            self._send(404, {"x-amzn-ErrorType": "ResourceNotFoundException"},
                       {"Type": "User", "message": f"Function not found: arn:aws:lambda:us-east-1:{ACCOUNT}:"
                                                   f"function:{name}"})
        return function

    def _send(self, status: int, headers: dict[str, str], body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4()), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        function = self._function("/configuration")
        if function is not None:
            self._send(200, {}, {"FunctionName": function.name, "MemorySize": function.memory_mb,
                                 "Timeout": int(function.timeout_s), "Runtime": "python3.11",
                                 "Handler": function.handler, "Architectures": ["x86_64"],
                                 "FunctionArn": f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:{function.name}"})

    def do_POST(self) -> None:
        event = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        function = self._function("/invocations")
        if function is not None:
            self._send(*self.emulator.invoke(function, event))
