"""Diagnostic functions of the runtime itself: a no-op (the interpreter baseline), memory, sleep and crash probes."""

from __future__ import annotations

import os
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gradshard.runtime.registry import register
from gradshard.store import Store


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllocateArgs(NoArgs):
    bytes: int = Field(ge=0)


class SleepArgs(NoArgs):
    seconds: float = Field(ge=0)


class Empty(NoArgs):
    """The result of a function that returns nothing."""


class AllocateResult(NoArgs):
    sum: int


def noop(args: NoArgs, store: Store) -> Empty:
    """Does nothing; its report measures the interpreter baseline of a function."""
    return Empty()


def allocate(args: AllocateArgs, store: Store) -> AllocateResult:
    """Touches ``bytes`` of memory; used to check that memory caps are enforced."""
    block = np.ones(args.bytes, dtype=np.uint8)
    return AllocateResult(sum=int(block[:: 4096].sum()))


def sleep(args: SleepArgs, store: Store) -> Empty:
    """Sleeps ``seconds``; used to test timeouts (and concurrency)."""
    time.sleep(args.seconds)
    return Empty()


def crash(args: NoArgs, store: Store) -> Empty:
    """Exits the process at once with status 3, without a report; used to test crash handling."""
    os._exit(3)


register("noop", noop, args=NoArgs, result=Empty)
register("allocate", allocate, args=AllocateArgs, result=AllocateResult)
register("sleep", sleep, args=SleepArgs, result=Empty)
register("crash", crash, args=NoArgs, result=Empty)
