"""Load shedding at the ingress: admit a request only if it can finish before its deadline.

The ingress knows what each request costs (``serving.cost``: network evaluations) and
measures how fast the stages work through that cost while they are busy (an exponential
moving average of cost units per second). A request is admitted when the work already in
flight plus its own would be done within ``limits.request_timeout_s`` at that rate;
otherwise it is answered at once with 503 and a ``Retry-After`` of the time the work in
flight needs to drain, instead of a 504 after waiting out its deadline. Until the first
measurement (a cold start, e.g. a storm on a fresh replica) at most ``cold_cost`` (one
request budget) is let in at a time, so the first requests measure the rate instead of
all of them timing out together.

Each ingress replica decides for the requests it holds: with several replicas, each sees
its share of the load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Overloaded(Exception):
    """The request would not finish before its deadline: answer 503 with ``retry_after_s``."""

    def __init__(self, retry_after_s: float, wait_s: float | None) -> None:
        why = (
            "the service is measuring its speed on the first requests"
            if wait_s is None
            else f"this request would wait about {wait_s:.0f} s for the work already in flight"
        )
        super().__init__(f"overloaded: {why}; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Admission:
    """Cost in flight and the measured rate (cost units per second) at which it drains."""

    def __init__(
        self,
        deadline_s: float,
        cold_cost: int,
        smoothing: float = 0.3,
        min_sample_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deadline_s = deadline_s
        self.cold_cost = cold_cost
        self.smoothing = smoothing
        self.min_sample_s = min_sample_s
        self.clock = clock
        self.in_flight = 0
        self.rate: float | None = None  # cost units per second while busy
        self._done_since = 0  # cost completed since the last rate sample
        self._busy_since: float | None = None

    def admit(self, cost: int) -> None:
        """Count ``cost`` in, or raise ``Overloaded``."""
        if self.in_flight > 0 and self.rate is None and self.in_flight + cost > self.cold_cost:
            raise Overloaded(retry_after_s=self.drain_s(), wait_s=None)
        if self.in_flight > 0 and self.rate is not None:
            wait = (self.in_flight + cost) / self.rate
            if wait > self.deadline_s:
                raise Overloaded(retry_after_s=self.drain_s(), wait_s=wait)
        if self.in_flight == 0:
            self._busy_since = self.clock()
            self._done_since = 0
        self.in_flight += cost

    def drain_s(self) -> int:
        """Whole seconds until the work in flight is done at the measured rate (at least 1;
        a quarter of the deadline before any measurement)."""
        if not self.rate:
            return max(1, math.ceil(self.deadline_s / 4))
        return max(1, math.ceil(self.in_flight / self.rate))

    def release(self, cost: int, completed: bool) -> None:
        """Count ``cost`` out; a ``completed`` request's cost is a sample of the rate."""
        self.in_flight -= cost
        now = self.clock()
        if completed and self._busy_since is not None:
            self._done_since += cost
            elapsed = now - self._busy_since
            # a sample spans at least min_sample_s (requests of one batch end together), or
            # a whole busy period
            if elapsed >= self.min_sample_s or (self.in_flight == 0 and elapsed > 0):
                sample = self._done_since / elapsed
                a = self.smoothing
                self.rate = sample if self.rate is None else (1 - a) * self.rate + a * sample
                self._busy_since, self._done_since = now, 0
        if self.in_flight == 0:
            self._busy_since = None
