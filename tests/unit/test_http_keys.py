"""API keys and the gateway's latency histograms, without a server."""

from __future__ import annotations

import json

import pytest

from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.http.keys import ApiKey, KeyRing
from llmos_kernel.latency import LATENCY_BOUNDS, Latency


def test_a_keys_file_maps_each_key_to_its_process_settings(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"alice-key-123": {"name": "alice", "priority": 5,
                                                  "tokens": 1000, "max_streams": 2},
                                "bob-key-4567": {"name": "bob"}}))
    ring = KeyRing.load(path, api_key="single-key-xyz")
    assert ring.find("alice-key-123") == ApiKey("alice", 5, 1000, 2)
    assert ring.find("alice-key-123").quotas == {"tokens": 1000}
    assert ring.find("bob-key-4567").quotas is None
    assert ring.find("single-key-xyz").name == "api-key"
    assert ring.find("alice-key-12") is None and ring.find(None) is None
    assert not ring.open and KeyRing({}).open


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot read the keys file"),
    ("[1, 2]", "expected an object"),
    ('{"k-123456789": {"priority": 1}}', "need a 'name'"),
    ('{"k-123456789": {"name": "a", "admin": true}}', "unknown key setting"),
    ('{"short": {"name": "a"}}', "at least 8 characters"),
])
def test_a_bad_keys_file_says_what_to_fix(tmp_path, content, match):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=match):
        KeyRing.load(path)


def test_latency_histograms_are_cumulative_per_bound():
    latency = Latency()
    latency.record(wire.Usage(completion_tokens=5, ttft_s=0.03, total_s=0.43))  # itl 0.1
    latency.record(wire.Usage(completion_tokens=1, ttft_s=2.0, total_s=2.0))  # no itl
    latency.record(wire.Usage(completion_tokens=0, ttft_s=0.0, total_s=0.1))  # aborted
    got = latency.to_dict()
    bound = {b: i for i, b in enumerate(LATENCY_BOUNDS)}
    assert got["totals"] == {"ttft": 2, "itl": 1}
    assert got["counts"]["ttft"][bound[0.025]] == 0 and got["counts"]["ttft"][bound[0.05]] == 1
    assert got["counts"]["ttft"][bound[2.5]] == 2
    assert got["counts"]["itl"][bound[0.05]] == 0 and got["counts"]["itl"][bound[0.1]] == 1
    assert got["sums"]["ttft"] == pytest.approx(2.03)
