"""``GET /metrics``: the kernel and the gateway in Prometheus's text format.

A scrape asks the kernel for two things, ``status`` and the live ``ps``, at once and
with a deadline, then renders them with a collector of its own on a private registry:
nothing is polled in the background and nothing is kept between scrapes, so a scrape
costs two driver calls and its numbers are the kernel's own at that moment. A kernel
call that fails or is late does not fail the scrape: what was read is still exposed,
with ``llmos_up 0``. Counters are the kernel's cumulative totals (they restart from zero
when the kernel does, which Prometheus's ``rate`` expects); latency histograms are the
kernel's cumulative bucket counts, exposed as they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from llmos_kernel.http.gateway import Gateway, KeyState

log = logging.getLogger(__name__)

router = APIRouter()

SCRAPE_DEADLINE_S = 5.0  # per kernel call; Prometheus's own default timeout is 10 s

# (status["queues"] key, metric name, help)
_QUEUES = [
    ("running", "llmos_requests_running", "Sequences the engine is computing."),
    ("waiting", "llmos_requests_waiting", "Sequences queued for their first step."),
    ("swapped", "llmos_requests_swapped", "Preempted sequences whose KV is in host swap."),
    ("parked", "llmos_requests_parked", "Suspended sequences kept out of scheduling."),
]
# (status["memory"] key, metric name, help)
_MEMORY = [
    ("num_blocks", "llmos_kv_blocks_capacity", "Blocks in the KV pool."),
    ("kv_blocks_used", "llmos_kv_blocks_used", "KV blocks held by sequences."),
    ("kv_blocks_free", "llmos_kv_blocks_free", "KV blocks free for allocation."),
    ("kv_blocks_cached", "llmos_kv_blocks_cached", "KV blocks kept for prefix reuse."),
    ("kv_bytes_used", "llmos_kv_used_bytes", "Bytes of the KV pool held by sequences."),
    ("kv_pool_bytes", "llmos_kv_pool_bytes", "Bytes of the whole KV pool."),
    ("weight_bytes", "llmos_weight_bytes", "Bytes of the model's weights."),
    ("swap_blocks", "llmos_swap_blocks_capacity", "Blocks of host swap space."),
    ("swap_blocks_used", "llmos_swap_blocks_used", "Host swap blocks in use."),
]
# (status["engine"] key, metric name, help)
_ENGINE = [
    ("steps", "llmos_engine_steps", "Engine steps run."),
    ("tokens_computed", "llmos_engine_tokens_computed",
     "Tokens the model computed (prompt and generated)."),
    ("tokens_generated", "llmos_engine_tokens_generated", "Tokens sampled for requests."),
]
# (status["ipc"] key, metric name, help)
_IPC = [
    ("sent", "llmos_messages_sent", "Messages accepted for delivery."),
    ("delivered", "llmos_messages_delivered", "Messages handed to their receiver."),
    ("acked", "llmos_messages_acked", "Messages their receiver finished handling."),
    ("dead", "llmos_messages_dead_lettered", "Messages that will never be delivered."),
]
# (status["latency"] name, metric name, help)
_LATENCY = [
    ("ttft", "llmos_time_to_first_token_seconds", "Finished requests' time to first token."),
    ("itl", "llmos_inter_token_latency_seconds",
     "Finished requests' mean time per output token after the first."),
]


@dataclass
class Snapshot:
    """What one scrape read: each part is None where its kernel call failed."""

    status: dict | None = None
    ps: list[dict] | None = None
    keys: dict[str, KeyState] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.status is not None and self.ps is not None


async def read(gateway: Gateway, deadline_s: float = SCRAPE_DEADLINE_S) -> Snapshot:
    """The kernel's status and live processes (concurrently) and the gateway's keys."""
    async def one(method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(gateway.call(method, *args), deadline_s)
        except Exception as e:  # noqa: BLE001 - a scrape says llmos_up 0, never a 500
            log.warning("metrics: kernel call %s failed: %s: %s", method, type(e).__name__, e)
            return None

    status, ps = await asyncio.gather(one("status"), one("ps", False))
    return Snapshot(status, ps, dict(gateway.keys))


class SnapshotCollector(Collector):
    """Turns one ``Snapshot`` into metric families; a missing part yields none of its own."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily("llmos_up", "1 when this scrape read the kernel's status and "
                                "process table, else 0.", value=int(snap.up))
        yield from _gateway(snap.keys)
        if snap.status is not None:
            yield from _kernel(snap.status)
        if snap.ps is not None:
            yield from _processes(snap.ps)


def render(snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    snapshot = await read(request.app.state.llmos.gateway)
    return Response(render(snapshot), media_type=CONTENT_TYPE_LATEST)


def _gateway(keys: dict[str, KeyState]) -> Iterator[Metric]:
    requests = CounterMetricFamily("llmos_http_requests", "HTTP model requests accepted, "
                                   "per API key.", labels=["key"])
    tokens_in = CounterMetricFamily("llmos_http_prompt_tokens", "Prompt tokens of HTTP "
                                    "requests, per API key.", labels=["key"])
    tokens_out = CounterMetricFamily("llmos_http_completion_tokens", "Tokens generated for "
                                     "HTTP requests, per API key.", labels=["key"])
    in_flight = GaugeMetricFamily("llmos_http_requests_in_flight", "HTTP model requests "
                                  "being served, per API key.", labels=["key"])
    for name, state in sorted(keys.items()):
        requests.add_metric([name], state.requests)
        tokens_in.add_metric([name], state.tokens_in)
        tokens_out.add_metric([name], state.tokens_out)
        in_flight.add_metric([name], state.streams)
    yield from (requests, tokens_in, tokens_out, in_flight)


def _kernel(status: dict) -> Iterator[Metric]:
    yield from _gauges(status.get("queues", {}), _QUEUES)
    yield from _gauges(status.get("memory", {}), _MEMORY)
    yield from _counters(status.get("engine", {}), _ENGINE)
    yield from _counters(status.get("ipc", {}), _IPC)
    if "pending" in status.get("ipc", {}):
        yield GaugeMetricFamily("llmos_messages_pending", "Messages waiting in mailboxes.",
                                value=status["ipc"]["pending"])
    preemptions = CounterMetricFamily("llmos_preemptions", "Sequences preempted, by how.",
                                      labels=["kind"])
    for kind, count in sorted(status.get("preemptions", {}).items()):
        preemptions.add_metric([kind], count)
    yield preemptions
    prefix = status.get("prefix_cache")
    if prefix:
        yield GaugeMetricFamily("llmos_prefix_cache_hit_rate", "Prompt tokens found in the "
                                "prefix cache over those looked up, since start.",
                                value=prefix["hit_rate"])
        yield CounterMetricFamily("llmos_prefix_cache_hit_tokens", "Prompt tokens found in "
                                  "the prefix cache.", value=prefix["hit_tokens"])
        yield CounterMetricFamily("llmos_prefix_cache_query_tokens", "Prompt tokens looked "
                                  "up in the prefix cache.", value=prefix["query_tokens"])
    if status.get("throughput_tok_s") is not None:
        yield GaugeMetricFamily("llmos_throughput_tokens_per_second", "Tokens generated per "
                                "second over the last ten seconds.",
                                value=status["throughput_tok_s"])
    if "live" in status.get("processes", {}):
        yield GaugeMetricFamily("llmos_processes_live", "Processes not yet exited.",
                                value=status["processes"]["live"])
    latency = status.get("latency")
    if latency:
        yield from _histograms(latency)


def _processes(ps: list[dict]) -> Iterator[Metric]:
    tokens = CounterMetricFamily("llmos_process_tokens", "Tokens charged to each live "
                                 "process.", labels=["pid", "name"])
    for p in ps:
        tokens.add_metric([str(p["pid"]), str(p.get("name") or "")], p.get("tokens_used") or 0)
    yield tokens


def _gauges(values: dict, table: list[tuple[str, str, str]]) -> Iterator[Metric]:
    for key, name, help_ in table:
        if values.get(key) is not None:
            yield GaugeMetricFamily(name, help_, value=values[key])


def _counters(values: dict, table: list[tuple[str, str, str]]) -> Iterator[Metric]:
    for key, name, help_ in table:
        if values.get(key) is not None:
            yield CounterMetricFamily(name, help_, value=values[key])


def _histograms(latency: dict) -> Iterator[Metric]:
    """The kernel keeps cumulative counts per upper bound; +Inf is every observation."""
    bounds = latency["bounds"]
    for key, name, help_ in _LATENCY:
        counts = latency["counts"][key]
        buckets = [(_bound(b), c) for b, c in zip(bounds, counts, strict=True)]
        buckets.append(("+Inf", latency["totals"][key]))
        yield HistogramMetricFamily(name, help_, buckets=buckets, sum_value=latency["sums"][key])


def _bound(value: float) -> str:
    return repr(float(value))
