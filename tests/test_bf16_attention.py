"""Attention from a bf16 pool, on AMX tiles or AVX512-BF16 (each this CPU has): close to
fp32 attention, and bit for bit the same for a token however its sequence's rows are
grouped."""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.core import bf16_attention, paged_attention
from llmos_kernel.core.model import StepBatch
from tests.test_bf16_gemm import kernel  # noqa: F401 - the fixture: each bf16 kernel here

H, KV, D, BS = 9, 3, 64, 16


def _pool(blocks: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks * BS, KV, D, generator=gen).bfloat16()
    v = torch.randn(blocks * BS, KV, D, generator=gen).bfloat16()
    return k, v, gen


def _case(spec: list[tuple[int, int]], seed: int = 0, blocks: int = 256):
    """Sequences of (rows, first position), each with its own scattered block table."""
    k, v, gen = _pool(blocks, seed)
    width = -(-max(n + p for n, p in spec) // BS)
    groups, row = [], 0
    for n, p in spec:
        groups.append([row, n, p])
        row += n
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in spec]).long()
    q = torch.randn(row, H, D, generator=gen)
    return q, k, v, torch.tensor(groups), tables


def _reference(q, k, v, groups, tables) -> torch.Tensor:
    """fp32 softmax attention of each row (its query rounded to bf16, as the kernel takes
    it) over its sequence's keys up to its position."""
    rows = []
    for (r0, n, p), table in zip(groups.tolist(), tables):
        for i in range(n):
            pos = p + i
            slots = torch.tensor([int(table[t // BS]) * BS + t % BS for t in range(pos + 1)])
            keys = k[slots].double().transpose(0, 1).repeat_interleave(H // KV, 0)
            values = v[slots].double().transpose(0, 1).repeat_interleave(H // KV, 0)
            query = q[r0 + i].bfloat16().double()
            w = torch.softmax((query[:, None, :] @ keys.transpose(1, 2))[:, 0] * D ** -0.5, -1)
            rows.append((w[:, None, :] @ values)[:, 0])
    return torch.stack(rows)


SPEC = [(1, 40), (37, 0), (5, 100), (1, 0), (50, 300), (3, 15), (16, 16)]


def test_close_to_fp32_attention_for_decodes_and_chunks(kernel):  # noqa: F811
    q, k, v, groups, tables = _case(SPEC)
    got = bf16_attention.attend(q, k, v, groups, tables, BS, D ** -0.5, kernel=kernel)
    want = _reference(q, k, v, groups, tables)
    # queries and probabilities are rounded to bf16 (2^-9): errors of that order, not more
    assert (got.double() - want).abs().max().item() <= 4e-3 * want.abs().max().item()


def test_a_tokens_result_does_not_depend_on_how_its_rows_are_grouped(kernel):  # noqa: F811
    """A 37-row prompt chunk computed whole, as 10 + 27, or row by row as decodes: the same
    bits for every row; so are the other sequences' rows beside it."""
    q, k, v, groups, tables = _case(SPEC, seed=1)
    whole = bf16_attention.attend(q, k, v, groups, tables, BS, D ** -0.5, kernel=kernel)
    r0, n, p = groups[1].tolist()
    split = torch.tensor([[0, 10, p], [10, 27, p + 10]])
    parts = bf16_attention.attend(q[r0:r0 + n], k, v, split, tables[[1, 1]], BS, D ** -0.5,
                                  kernel=kernel)
    assert torch.equal(parts, whole[r0:r0 + n])
    for i in (0, 15, 16, 36):
        alone = bf16_attention.attend(q[r0 + i:r0 + i + 1], k, v, torch.tensor([[0, 1, p + i]]),
                                     tables[[1]], BS, D ** -0.5, kernel=kernel)
        assert torch.equal(alone[0], whole[r0 + i]), i


def test_other_block_sizes_keep_the_contract_on_the_decode_kernel():
    """Blocks of 8 keys do not fit the tiles: the same rows go through the decode kernel."""
    k, v, gen = _pool(64, seed=2)
    groups = torch.tensor([[0, 6, 10], [6, 1, 30]])
    tables = torch.stack([torch.randperm(64, generator=gen)[:8] for _ in range(2)]).long()
    q = torch.randn(7, H, D, generator=gen)
    got = bf16_attention.attend(q, k, v, groups, tables, 8, D ** -0.5)
    lens = torch.tensor([11, 12, 13, 14, 15, 16, 31])
    want = paged_attention.decode(q, k, v, tables.repeat_interleave(torch.tensor([6, 1]), 0),
                                  lens, 8, D ** -0.5)
    assert torch.equal(got, want)
    # and so do the per-row tables a step builds once for all its layers
    batch = StepBatch(tokens=torch.zeros(7), positions=torch.zeros(7),
                      slot_mapping=torch.zeros(7), groups=groups, group_tables=tables)
    assert torch.equal(bf16_attention.attend(q, k, v, groups, tables, 8, D ** -0.5,
                                             batch.row_tables), want)


def test_refuses_an_fp32_pool():
    k, v = torch.zeros(16, KV, D), torch.zeros(16, KV, D)
    with pytest.raises(ValueError, match="bf16"):
        bf16_attention.attend(torch.zeros(1, H, D), k, v, torch.tensor([[0, 1, 0]]),
                             torch.zeros(1, 1, dtype=torch.long), BS, 0.125)
