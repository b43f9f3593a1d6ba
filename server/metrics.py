"""Prometheus metrics, prefix ``vqdiff_``, named and labelled in the style of vLLM and TGI.

Each engine owns its registry (several servers can live in one test process). Every number is
recorded where the event happens (the engine thread), so the dashboard shows what the engine did,
not what a handler believes.
"""

from __future__ import annotations

import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the exposition and no dashboard reads them

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ROW_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
OUTCOMES = ("success", "cancelled", "deadline", "failed", "unavailable", "rejected", "invalid", "unauthenticated")


def resident_bytes() -> int:
    """The process's resident set now (Linux: /proc/self/statm); elsewhere its peak, the best known."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Metrics:
    def __init__(self, model_name: str, device, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.device = device
        r, m = self.registry, ("model_name",)
        self.requests = Counter("vqdiff_requests", "Requests by outcome", m + ("outcome",), registry=r)
        self.latency = Histogram("vqdiff_request_latency_seconds", "Arrival to result (successful requests)", m,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("vqdiff_request_queue_seconds", "Arrival to admission into the running batch", m,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_preview = Histogram("vqdiff_time_to_first_preview_seconds", "Arrival to the first streamed preview",
                                       m, buckets=LATENCY_BUCKETS, registry=r)
        self.step_duration = Histogram("vqdiff_step_duration_seconds", "One engine step: forward and sampling step",
                                       m, buckets=STEP_BUCKETS, registry=r)
        self.rows = Histogram("vqdiff_rows_per_forward", "Rows (2 per image: cond + uncond) in one forward", m,
                              buckets=ROW_BUCKETS, registry=r)
        self.running = Gauge("vqdiff_requests_running", "Requests in the running batch", m, registry=r)
        self.waiting = Gauge("vqdiff_requests_waiting", "Requests queued for admission", m, registry=r)
        self.images = Counter("vqdiff_images", "Images generated", m, registry=r)
        self.forwards = Counter("vqdiff_forward_passes", "Transformer forward passes", m, registry=r)
        self.retries = Counter("vqdiff_batch_retries", "Steps re-run as smaller batches after an error", m, registry=r)
        self.memory = Gauge("vqdiff_device_memory_bytes", "Memory in use on the model's device (CUDA: allocated by "
                            "torch; CPU: the process's resident set now)", m + ("device",), registry=r)
        self.memory_peak = Gauge("vqdiff_device_memory_peak_bytes", "The most memory in use on the model's device "
                                 "since the process started (CUDA: allocated by torch; CPU: the peak resident set)",
                                 m + ("device",), registry=r)
        self._model_name = model_name
        self.add_model(model_name)

    @property
    def model_name(self) -> str:
        """The label of what is counted without naming a model."""
        return self._model_name

    def add_model(self, model_name: str) -> None:
        """Every request series of ``model_name`` exists from now on (rate() over a missing series is empty)."""
        for outcome in OUTCOMES:
            self.requests.labels(model_name, outcome)

    def label(self, metric, model_name: str | None = None):
        return metric.labels(model_name or self.model_name)

    def count(self, outcome: str, model_name: str | None = None) -> None:
        self.requests.labels(model_name or self.model_name, outcome).inc()

    def sample_memory(self) -> None:
        import torch

        dev = str(self.device)
        if dev.startswith("cuda") and torch.cuda.is_available():
            used, peak = torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
        else:
            used, peak = resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        self.memory.labels(self.model_name, dev).set(used)
        self.memory_peak.labels(self.model_name, dev).set(max(peak, used))

    def exposition(self) -> bytes:
        self.sample_memory()
        return generate_latest(self.registry)
