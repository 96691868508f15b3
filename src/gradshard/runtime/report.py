"""What one invocation did: the measured side of every plan."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from gradshard.runtime.failure import error_fields
from gradshard.security.tokens import REFUSALS

__all__ = ["DETERMINISTIC_ERRORS", "InvocationReport", "error_fields"]

# Errors that will fail again on retry with the same input: reported at once, never retried. A function's refusal
# of its invocation token (REFUSALS) is one too: a token that fails a check means a misconfigured or forged call.
DETERMINISTIC_ERRORS = frozenset({"UpdateError", "BadUpdatesError", "MemoryLimitError", "RoundError", "PlanError",
                                  "LayoutError", "ValidationError",
                                  # AWS Lambda refusals that a retry cannot change
                                  "ResourceNotFoundException", "AccessDeniedException",
                                  "InvalidParameterValueException", "RequestTooLargeException"}) | REFUSALS


class InvocationReport(BaseModel):
    """Measured duration, peak memory and I/O of one invocation (its last attempt), and its outcome."""

    invocation: str
    function: str
    ok: bool
    attempts: int = 1
    warm: bool = False  # ran in a warm worker kept from an earlier invocation
    duration_s: float = 0.0  # the function's own run time (what a serverless platform bills)
    wall_s: float = 0.0  # including process start and hand-back
    peak_rss_bytes: int | None = None
    memory_cap_bytes: int | None = None
    predicted_bytes: int | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    gets: int = 0
    puts: int = 0
    error_type: str | None = None
    error: str | None = None
    client: str | None = None
    reason: str | None = None
    bad_clients: dict[str, str] = Field(default_factory=dict)  # every bad update the function found (client: reason)
    host: str | None = None  # where it ran, on executors that span machines (the Ray node id)
    result: dict[str, Any] = Field(default_factory=dict)

    @property
    def bad_updates(self) -> dict[str, str]:
        """The bad client updates this invocation found: ``client -> reason`` (empty unless it failed on them)."""
        if self.error_type not in ("UpdateError", "BadUpdatesError") or not self.client:
            return {}
        return self.bad_clients or {self.client: self.reason or self.error or ""}

    @property
    def retryable(self) -> bool:
        return not self.ok and self.error_type not in DETERMINISTIC_ERRORS


