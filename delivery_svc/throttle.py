"""Rate limits: a token bucket per channel activity and one per provider, over an injectable clock.

A :class:`TokenBucket` holds at most ``burst`` tokens (one second's worth by default) and refills at
``rate`` tokens per second; :meth:`TokenBucket.acquire` takes one token, sleeping on the clock until
one is available. Buckets are thread-safe (providers send on worker threads) and never hold their
lock while sleeping. Time comes from a :class:`Clock`, so tests drive a fake one and assert on the
simulated time rather than the wall clock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Protocol

from carillon_chassis.database import utcnow

_EPSILON = 1e-9


class Clock(Protocol):
    """Where the pipeline gets the time and how it waits."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds of a monotonic clock."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """The current UTC time."""
        return utcnow()

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """``time.sleep()``."""
        if seconds > 0:
            time.sleep(seconds)


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, with bursts of at most ``burst``."""

    def __init__(self, rate: float, clock: Clock, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.clock = clock
        self._lock = threading.Lock()
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self._tokens = self.burst
        self._stamp = clock.monotonic()

    def set_rate(self, rate: float) -> None:
        """Change the rate (and the default burst) from now on."""
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        with self._lock:
            self._refill()
            self.rate = float(rate)
            self.burst = max(1.0, self.rate)
            self._tokens = min(self._tokens, self.burst)

    def _refill(self) -> None:
        now = self.clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def acquire(self) -> float:
        """Take one token, sleeping until one is available; returns the seconds slept."""
        slept = 0.0
        while True:
            with self._lock:
                self._refill()
                if self._tokens >= 1.0 - _EPSILON:  # rounding must not leave a sleep too short to count
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return slept
                wait = (1.0 - self._tokens) / self.rate
            self.clock.sleep(wait)
            slept += wait


class ActivityBuckets:
    """The token bucket of each channel activity (sandbox, run, activity), shared by its streams.

    Keeps the most recently used ``capacity`` activities; an evicted activity starts a fresh bucket.
    """

    def __init__(self, clock: Clock, capacity: int = 1024) -> None:
        self.clock = clock
        self.capacity = capacity
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str, str], TokenBucket] = OrderedDict()

    def get(self, key: tuple[str, str, str], rate: int) -> TokenBucket | None:
        """The bucket of ``key`` at ``rate`` messages per second; None when ``rate`` is 0 (no limit)."""
        if rate <= 0:
            return None
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = TokenBucket(rate, self.clock)
                self._buckets[key] = bucket
                while len(self._buckets) > self.capacity:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                if bucket.rate != rate:
                    bucket.set_rate(rate)
            return bucket
