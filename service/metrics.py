"""Prometheus metrics of the server (prometheus-client), served on --metrics-port.

Request metrics are observed as outputs pass through the servicer. Engine gauges and
counters (running, waiting, KV usage, preemptions, prefix cache) are read from
engine.stats() at scrape time, so nothing polls the engine between scrapes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latencies on a CPU span milliseconds (a decode step of a tiny model) to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None):
        self.model = model  # the label; set to the model's id once it is loaded
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "textgen_requests", "Finished requests by finish reason (of sequence 0)",
            ["model", "finish_reason"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "textgen_request_errors", "Requests that ended with a gRPC error, by status code",
            ["model", "code"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "textgen_time_to_first_token_seconds", "From request arrival to its first token",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "textgen_inter_token_latency_seconds", "Between two successive steps' tokens of a request",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "textgen_request_duration_seconds", "From request arrival to its last output",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "textgen_request_queue_time_seconds", "From request arrival in the engine to its first schedule",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._http = None  # (server, thread) of the /metrics endpoint once served

    def count_error(self, code: str) -> None:
        self.errors.labels(self.model, code).inc()

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)

    def watch_engine(self, engine) -> None:
        self.registry.register(_EngineCollector(engine, lambda: self.model))

    def serve(self, host: str, port: int) -> None:
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def stop_serving(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None


class RequestTimer:
    """Times one request's outputs into the latency histograms."""

    def __init__(self, metrics: ServiceMetrics):
        self._metrics = metrics
        self._start = time.monotonic()
        self._last_token: float | None = None
        self._queued = False

    def observe(self, output) -> None:
        """`output` is one RequestOutput of the request."""
        m, now = self._metrics, time.monotonic()
        if not self._queued and output.queue_time_s is not None:
            self._queued = True
            m.queue_time.labels(m.model).observe(output.queue_time_s)
        if any(seq.token_ids for seq in output.sequences):
            if self._last_token is None:
                m.ttft.labels(m.model).observe(now - self._start)
            else:
                m.itl.labels(m.model).observe(now - self._last_token)
            self._last_token = now
        if output.finished:
            m.e2e.labels(m.model).observe(now - self._start)
            first = min(output.sequences, key=lambda seq: seq.index, default=None)
            reason = first.finish_reason.value if first and first.finish_reason else "unknown"
            m.requests.labels(m.model, reason).inc()


class _EngineCollector:
    """Reads engine.stats() on each scrape."""

    def __init__(self, engine, model):
        self._engine = engine
        self._model = model

    def collect(self):
        s = self._engine.stats()
        labels = [self._model()]

        def gauge(name, doc, value):
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric(labels, value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc, labels=["model"])
            family.add_metric(labels, value)
            return family

        yield gauge("textgen_requests_running", "Requests in the running batch", s.running)
        yield gauge("textgen_requests_waiting", "Requests admitted but not running", s.waiting)
        yield gauge("textgen_kv_blocks_used", "KV cache blocks in use", s.kv_blocks_used)
        yield gauge("textgen_kv_blocks_total", "KV cache blocks in the pool", s.kv_blocks_total)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield gauge("textgen_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", usage)
        yield gauge("textgen_engine_healthy", "1 while the step loop is healthy", 1.0 if s.healthy else 0.0)
        yield counter("textgen_preemptions", "Requests preempted to free KV blocks", s.preemptions_total)
        yield counter("textgen_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                      s.prefix_cache_queries_total)  # fmt: skip
        yield counter("textgen_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                      s.prefix_cache_hits_total)  # fmt: skip
        yield counter("textgen_engine_steps", "Engine steps run", s.steps_total)
