"""Retries for every Keel gRPC client: exponential backoff with full jitter on UNAVAILABLE.

A call that is still UNAVAILABLE when the budget is spent raises `Unavailable`, naming the
peer and the number of attempts, so a training step never goes on with something missing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class Unavailable(RuntimeError):
    """A peer that could not be reached within the retry budget."""


def backoff_delays(
    retries: int, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None
) -> list[float]:
    """Full-jitter exponential backoff: delay_k ~ U(0, min(cap, base * 2^k)), k = 0..retries-1."""
    rng = rng or random.Random()
    return [rng.uniform(0.0, min(cap_s, base_s * 2**k)) for k in range(retries)]


def grpc_status(err: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an error: its own, or that of the RpcError it was raised from."""
    for e in (err, err.__cause__):
        if isinstance(e, grpc.RpcError):
            return e.code()
    return None


def _details(err: BaseException) -> str:
    return err.details() if isinstance(err, grpc.RpcError) else str(err)


def call_with_retries(
    call: Callable[[], T],
    retries: int,
    what: str,
    base_delay_s: float = 0.1,
    unavailable: type[Exception] = Unavailable,
) -> T:
    """Run `call`; while it fails with UNAVAILABLE (directly or as the cause of another error),
    sleep and try again, at most `retries` more times.

    Any other error propagates unchanged; UNAVAILABLE that outlasts the budget becomes
    `unavailable("{what}: UNAVAILABLE after N attempt(s): details")`.
    """
    delays = backoff_delays(retries, base_delay_s)
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as err:
            if grpc_status(err) not in RETRYABLE:
                raise
            if attempt == retries:
                raise unavailable(f"{what}: UNAVAILABLE after {attempt + 1} attempt(s): {_details(err)}") from None
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover
