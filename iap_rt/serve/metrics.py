"""The gateway's Prometheus metrics, rendered in the text exposition format (no dependency).

``iap_rt_requests_total{route,status}``, ``iap_rt_request_duration_seconds`` (histogram of
image requests), ``iap_rt_images_generated_total``, ``iap_rt_batch_size`` (histogram: per image,
how many images shared its UNet batch), ``iap_rt_batches_total`` (UNet batches, counted as the
sum of 1/batch over images, so images / batches is the mean batch size), ``iap_rt_queue_depth``
(images admitted and not answered) and ``iap_rt_requests_in_flight``. Triton's own metrics
(``nv_inference_*``) are on its metrics port.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """A cumulative-bucket histogram."""

    def __init__(self, buckets: tuple):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            total += c
            le = "+Inf" if b == math.inf else f"{b:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    """Thread-safe counters of one gateway."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.batches = 0.0
        self.queue_depth = 0
        self.in_flight = 0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def generated(self, seconds: float, batches: list[int]) -> None:
        """A request answered with images; ``batches``: each image's UNet batch size."""
        with self._lock:
            self.latency.observe(seconds)
            self.images += len(batches)
            for b in batches:
                self.batch.observe(b)
                self.batches += 1.0 / max(1, b)

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP iap_rt_requests_total HTTP requests by route and status.",
                "# TYPE iap_rt_requests_total counter",
            ]
            for (route, status), c in sorted(self.requests.items()):
                lines.append(f'iap_rt_requests_total{{route="{route}",status="{status}"}} {c}')
            lines += [
                "# HELP iap_rt_request_duration_seconds Latency of answered image requests.",
                "# TYPE iap_rt_request_duration_seconds histogram",
                *self.latency.lines("iap_rt_request_duration_seconds"),
                "# HELP iap_rt_images_generated_total Images generated and returned.",
                "# TYPE iap_rt_images_generated_total counter",
                f"iap_rt_images_generated_total {self.images}",
                "# HELP iap_rt_batch_size Per image: the images that shared its UNet batch.",
                "# TYPE iap_rt_batch_size histogram",
                *self.batch.lines("iap_rt_batch_size"),
                "# HELP iap_rt_batches_total UNet batches (sum of 1/batch size over images).",
                "# TYPE iap_rt_batches_total counter",
                f"iap_rt_batches_total {self.batches:.6f}",
                "# HELP iap_rt_queue_depth Images admitted and not yet answered.",
                "# TYPE iap_rt_queue_depth gauge",
                f"iap_rt_queue_depth {self.queue_depth}",
                "# HELP iap_rt_requests_in_flight Image requests being answered.",
                "# TYPE iap_rt_requests_in_flight gauge",
                f"iap_rt_requests_in_flight {self.in_flight}",
            ]
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus text page (for clients and tests)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
