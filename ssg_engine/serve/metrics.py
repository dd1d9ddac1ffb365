"""The server's counters, rendered as Prometheus text (``GET /metrics``): requests by status, images, queue depth,
batch sizes, request latency and batch time histograms, and images/s over the last minute."""
from __future__ import annotations

import bisect
import collections
import threading
import time
from typing import Callable, Deque, Dict, List, Sequence, Tuple

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW_S = 60.0


class Histogram:
    """A Prometheus histogram: cumulative bucket counts at ``bounds`` (+Inf implied), sum and count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str) -> List[str]:
        out, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    """Thread-safe counters of one server; ``queue_depth`` is read when rendering (the scheduler's ``queued_rows``)."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], int]) -> None:
        self.queue_depth = queue_depth
        self.requests: Dict[int, int] = collections.Counter()
        self.images = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch) + (max_batch,))
        self._recent: Deque[Tuple[float, int]] = collections.deque()  # (time, images) of finished requests
        self._lock = threading.Lock()

    def request(self, status: int, seconds: float, images: int = 0) -> None:
        """Count a finished request with its HTTP ``status``, latency and images served."""
        with self._lock:
            self.requests[status] += 1
            if status == 200:
                self.latency.observe(seconds)
                self.images += images
                self._recent.append((time.monotonic(), images))

    def batch(self, size: int, seconds: float) -> None:
        """Count one batch of ``size`` rows that took ``seconds``."""
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)

    def images_per_second(self) -> float:
        """Images served per second over the last ``RATE_WINDOW_S`` seconds."""
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP ssg_requests_total Image requests answered, by HTTP status.", "# TYPE ssg_requests_total counter"]
            lines += [f'ssg_requests_total{{code="{code}"}} {count}' for code, count in sorted(self.requests.items())]
            lines += ["# HELP ssg_images_total Images served.", "# TYPE ssg_images_total counter", f"ssg_images_total {self.images}",
                      "# HELP ssg_queue_depth Images waiting for a batch.", "# TYPE ssg_queue_depth gauge",
                      f"ssg_queue_depth {self.queue_depth()}",
                      f"# HELP ssg_images_per_second Images served per second over the last {RATE_WINDOW_S:g} s.",
                      "# TYPE ssg_images_per_second gauge", f"ssg_images_per_second {self.images_per_second():.6f}",
                      "# HELP ssg_request_latency_seconds Latency of successful image requests.",
                      "# TYPE ssg_request_latency_seconds histogram"]
            lines += self.latency.lines("ssg_request_latency_seconds")
            lines += ["# HELP ssg_batch_size Rows (images) per batch.", "# TYPE ssg_batch_size histogram"]
            lines += self.batch_size.lines("ssg_batch_size")
            lines += ["# HELP ssg_batch_seconds Time of one batch.", "# TYPE ssg_batch_seconds histogram"]
            lines += self.batch_seconds.lines("ssg_batch_seconds")
        return "\n".join(lines) + "\n"
