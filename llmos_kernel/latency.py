"""Latency histograms of finished requests, kept by the LLM service for ``/metrics``.

Cumulative counts per upper bound, as Prometheus histograms hold them, so the kernel's
status carries them as plain numbers and a scrape needs no state of its own.
"""

from __future__ import annotations

from llmos_kernel import wire

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Latency:
    """Cumulative histograms of finished requests' time to first token and time per
    output token after it (what Prometheus histograms hold: counts per upper bound)."""

    def __init__(self) -> None:
        self.counts = {"ttft": [0] * len(LATENCY_BOUNDS), "itl": [0] * len(LATENCY_BOUNDS)}
        self.sums = {"ttft": 0.0, "itl": 0.0}
        self.totals = {"ttft": 0, "itl": 0}

    def record(self, usage: wire.Usage) -> None:
        if usage.completion_tokens < 1:
            return
        self._add("ttft", usage.ttft_s)
        if usage.completion_tokens > 1:
            self._add("itl", max(usage.total_s - usage.ttft_s, 0.0)
                      / (usage.completion_tokens - 1))

    def _add(self, name: str, seconds: float) -> None:
        self.sums[name] += seconds
        self.totals[name] += 1
        for i, bound in enumerate(LATENCY_BOUNDS):
            if seconds <= bound:
                self.counts[name][i] += 1

    def to_dict(self) -> dict:
        return {"bounds": list(LATENCY_BOUNDS), "counts": self.counts, "sums": self.sums,
                "totals": self.totals}
