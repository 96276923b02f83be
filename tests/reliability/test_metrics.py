"""The Prometheus endpoint (--metrics-port), scraped over HTTP before and after traffic:
every figure an operator watches moves as the traffic says it should."""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import TextGenerationClient, TextGenerationError
from tests.reliability.helpers import wait_for
from tests.servers import BackgroundServer

PROMPT = (  # over one 16-token block, so that a repeat finds a full block cached
    "The old lighthouse keeper walked along the rocky shore every single morning, counting gulls, "
    "boats and waves, and then"
)
HISTOGRAMS = (
    "textgen_time_to_first_token_seconds",
    "textgen_inter_token_latency_seconds",
    "textgen_request_duration_seconds",
    "textgen_request_queue_time_seconds",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the live endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def server(tiny_llama):
    from engine import AsyncEngine

    port = free_port()
    # A small pool (24 blocks) so that four long requests at once must preempt.
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=24, block_size=16, max_num_seqs=4)
    server = BackgroundServer(engine, "--metrics-port", str(port))
    server.metrics_port = port
    yield server
    server.close()


def test_metrics_move_with_the_traffic(server, caplog):
    model = (("model", server.engine.info.model_id),)

    def value(figures, name, **labels):
        return figures.get((name, tuple(sorted({**dict(model), **labels}.items()))), 0.0)

    before = scrape(server.metrics_port)
    caplog.set_level(logging.INFO, logger="service")
    with TextGenerationClient(server.target, timeout=60) as client:
        # Two identical requests: the second finds the prompt's full blocks in the prefix cache.
        for i in range(2):
            client.generate(PROMPT, max_new_tokens=8, ignore_eos=True, request_id=f"metrics-{i}")
        with pytest.raises(TextGenerationError):
            client.generate(PROMPT, max_new_tokens=0)
        # While a stream runs, the gauges show it.
        stream = client.generate_stream(PROMPT, max_new_tokens=300, ignore_eos=True)
        next(stream)
        during = wait_for(
            lambda: (f := scrape(server.metrics_port))
            and value(f, "textgen_requests_running") == 1
            and value(f, "textgen_kv_blocks_used") > 0
            and f,
            what="a running request in the gauges",
        )
        assert 0 < value(during, "textgen_kv_cache_usage_ratio") <= 1
        stream.close()  # cancelled
        server.wait_idle()
        # Four requests of ~130 tokens (9 blocks each) in a 24-block pool: preemption.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(client.generate, f"{PROMPT} {i}", max_new_tokens=100, ignore_eos=True) for i in range(4)
            ]
            assert all(f.result(60).usage.completion_tokens == 100 for f in futures)
    server.wait_idle()
    wait_for(
        lambda: value(scrape(server.metrics_port), "textgen_request_errors_total", code="CANCELLED")
        > value(before, "textgen_request_errors_total", code="CANCELLED"),
        what="the cancellation counted",
    )
    after = scrape(server.metrics_port)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("textgen_requests_total", finish_reason="length") == 6
    assert moved("textgen_request_errors_total", code="INVALID_ARGUMENT") == 1
    assert moved("textgen_request_errors_total", code="CANCELLED") == 1
    for name in HISTOGRAMS:
        assert moved(f"{name}_count") >= 6, name
        assert moved(f"{name}_sum") > 0, name
    assert moved("textgen_inter_token_latency_seconds_count") >= 6 * 7
    assert moved("textgen_preemptions_total") > 0
    assert moved("textgen_prefix_cache_hits_total") >= 16
    assert moved("textgen_prefix_cache_queries_total") > moved("textgen_prefix_cache_hits_total")
    assert moved("textgen_engine_steps_total") > 0
    # At rest again: nothing running or waiting, every block free, the engine healthy.
    for gauge in ("textgen_requests_running", "textgen_requests_waiting", "textgen_kv_blocks_used"):
        assert value(after, gauge) == 0, gauge
    assert value(after, "textgen_kv_blocks_total") == 24
    assert value(after, "textgen_engine_healthy") == 1
    # Logs name each request.
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[metrics-1] done: length") for m in logged), logged
    assert any(m.startswith("[metrics-1] start:") for m in logged)


def test_metrics_and_grpc_share_the_loopback_host_by_default(server):
    assert server.server.options.host == "127.0.0.1"
    with pytest.raises(OSError):
        # The endpoint listens on 127.0.0.1 only: another loopback address finds no listener.
        urllib.request.urlopen(f"http://127.0.0.2:{server.metrics_port}/metrics", timeout=2)
    with grpc.insecure_channel(f"127.0.0.2:{server.target.rsplit(':', 1)[1]}") as channel:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=1)
