"""What a failed invocation reports about its exception (no pydantic: function workers import it)."""

from __future__ import annotations

from typing import Any


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The report fields describing an exception (client and reason for a bad update)."""
    fields: dict[str, Any] = {"error_type": type(exc).__name__, "error": str(exc) or repr(exc)}
    if isinstance(exc, MemoryError) and type(exc).__name__ != "MemoryLimitError":
        fields["error_type"] = "MemoryLimitError"
        fields["error"] = f"out of memory: {exc}"
    client = getattr(exc, "client", None)
    if client is not None:
        fields["client"] = client
        fields["reason"] = getattr(exc, "reason", None)
        fields["bad_clients"] = dict(getattr(exc, "clients", None) or {client: fields["reason"] or ""})
    return fields
