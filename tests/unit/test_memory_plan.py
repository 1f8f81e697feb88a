"""The memory manager's arithmetic: sizes people type, and a KV pool of whole blocks that
never outgrows its byte budget. Devices are faked so the plan does not depend on this
machine's free memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmos_kernel import memory
from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.errors import InvalidArgument, QuotaExceeded
from llmos_kernel.memory import Device, GiB, parse_bytes, plan_memory

TINY = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=1000,
                   context_length=256)
PER_BLOCK_FP32 = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, tokens, kv heads, head_dim, bytes


@pytest.fixture(autouse=True)
def fake_machine(monkeypatch):
    """A CPU with 8 GiB free and 16 GiB available for swap."""
    monkeypatch.setattr(memory, "devices", lambda: [Device("cpu", "cpu", 16 * GiB, 8 * GiB)])
    monkeypatch.setattr(memory, "_available_ram", lambda: 16 * GiB)


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * GiB), ("512m", 512 << 20), ("1_000_000", 1_000_000), (" 2 KB ", 2048),
    ("1.5g", 3 * GiB // 2), (4096, 4096), ("7b", 7),
])
def test_sizes_in_the_units_people_type(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12 parsecs", "-1", "0", "0.1", "1e", True, 2.5, None])
def test_an_unreadable_size_says_how_to_write_one(bad):
    with pytest.raises(InvalidArgument, match="size"):
        parse_bytes(bad)


@given(budget=st.integers(4 * PER_BLOCK_FP32, 6 * GiB), block_size=st.sampled_from([8, 16, 32]))
def test_the_kv_pool_never_exceeds_its_byte_budget(budget, block_size):
    plan = plan_memory(TINY, torch.float32, kv_budget=budget, block_size=block_size,
                       swap_budget=0)
    assert plan.kv_pool_bytes <= budget < plan.kv_pool_bytes + plan.kv_bytes_per_block
    assert plan.num_blocks >= 2 and plan.swap_blocks == 0


def test_the_block_size_follows_the_model_and_dtype():
    fp32 = plan_memory(TINY, torch.float32, kv_budget="1MiB", block_size=16)
    bf16 = plan_memory(TINY, torch.bfloat16, kv_budget="1MiB", block_size=16)
    assert fp32.kv_bytes_per_block == PER_BLOCK_FP32 == 2 * bf16.kv_bytes_per_block
    assert bf16.num_blocks == 2 * fp32.num_blocks
    assert fp32.weight_bytes == 4 * TINY.n_params == 2 * bf16.weight_bytes


def test_auto_budgets_take_a_share_of_what_is_free():
    plan = plan_memory(TINY, torch.float32)
    assert plan.kv_budget_bytes == min(4 * GiB, int((8 * GiB - plan.weight_bytes) * 0.25))
    assert plan.swap_bytes == int(16 * GiB * 0.15)
    assert plan.swap_blocks == plan.swap_bytes // plan.kv_bytes_per_block


def test_a_budget_that_cannot_be_met_is_refused_with_the_fix():
    with pytest.raises(QuotaExceeded, match="does not fit on cpu: 8.00 GiB free"):
        plan_memory(TINY, torch.float32, kv_budget="9GiB")
    with pytest.raises(QuotaExceeded, match="fewer than 2 blocks .* raise --kv-budget"):
        plan_memory(TINY, torch.float32, kv_budget=PER_BLOCK_FP32 * 2 - 1)
    with pytest.raises(InvalidArgument, match=r"device 'cuda:3' is not available here \(have: cpu"):
        plan_memory(TINY, torch.float32, device="cuda:3")
