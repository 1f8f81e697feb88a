"""Stage boundaries and budgets (no model, no Ray): llmos_kernel.placement."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmos_kernel.core.gguf_file import ModelConfig
from llmos_kernel.errors import InvalidArgument, QuotaExceeded
from llmos_kernel.placement import (
    Place,
    check_budgets,
    split_layers,
    stage_weight_bytes,
    stage_work,
)

CFG = ModelConfig(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536,
                  vocab_size=49152, context_length=8192)


def _brute_force_best(n: int, by: str = "bytes") -> float:
    """The lightest heaviest stage over every way to cut 30 layers into ``n`` (n <= 3)."""
    def w(a, b):
        return stage_weight_bytes(CFG, 4, (a, b)) if by == "bytes" else stage_work(CFG, (a, b))
    if n == 2:
        return min(max(w(0, c), w(c, 30)) for c in range(1, 30))
    return min(max(w(0, c), w(c, d), w(d, 30)) for c in range(1, 29) for d in range(c + 1, 30))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 30])
def test_stages_cover_every_layer_in_order(n):
    stages = split_layers(CFG, torch.float32, n, num_blocks=10, block_size=16)
    assert [s.index for s in stages] == list(range(n))
    assert stages[0].layers[0] == 0 and stages[-1].layers[1] == 30
    assert all(a.layers[1] == b.layers[0] and a.layers[0] < a.layers[1]
               for a, b in itertools.pairwise(stages))
    whole = stage_weight_bytes(CFG, 4, (0, 30))
    assert sum(s.weight_bytes for s in stages) == whole
    kv = 10 * 2 * 30 * 16 * 3 * 64 * 4
    assert sum(s.kv_bytes for s in stages) == kv


@pytest.mark.parametrize("n", [2, 3])
def test_boundaries_balance_weight_bytes_as_well_as_any_cut(n):
    stages = split_layers(CFG, torch.float32, n, num_blocks=1, block_size=16, by="bytes")
    assert max(s.weight_bytes for s in stages) == _brute_force_best(n)


@pytest.mark.parametrize("n", [2, 3])
def test_boundaries_balance_per_token_work_as_well_as_any_cut(n):
    stages = split_layers(CFG, torch.float32, n, num_blocks=1, block_size=16)
    assert max(stage_work(CFG, s.layers) for s in stages) == _brute_force_best(n, "compute")


def test_the_embedding_and_head_weigh_on_the_end_stages():
    first, middle, last = split_layers(CFG, torch.bfloat16, 3, num_blocks=1, block_size=16,
                                       by="bytes")
    assert middle.layers[1] - middle.layers[0] > first.layers[1] - first.layers[0]
    assert middle.layers[1] - middle.layers[0] > last.layers[1] - last.layers[0]


def test_by_work_the_head_costs_the_last_stage_layers_and_the_embedding_costs_nothing():
    """The embedding is a lookup: split by work, the first stage takes more layers than it
    does split by bytes; the head is real work: the last stage takes fewer layers than
    the first."""
    work = split_layers(CFG, torch.bfloat16, 2, num_blocks=1, block_size=16)
    size = split_layers(CFG, torch.bfloat16, 2, num_blocks=1, block_size=16, by="bytes")
    assert work[0].layers[1] > size[0].layers[1]
    assert work[0].layers[1] - work[0].layers[0] > work[1].layers[1] - work[1].layers[0]
    with pytest.raises(ValueError, match="compute.*bytes"):
        split_layers(CFG, torch.bfloat16, 2, num_blocks=1, block_size=16, by="flops")


def test_more_stages_than_layers_is_refused_saying_how_many_fit():
    with pytest.raises(InvalidArgument, match="at most 30 stages"):
        split_layers(CFG, torch.float32, 99, num_blocks=1, block_size=16)
    with pytest.raises(InvalidArgument):
        split_layers(CFG, torch.float32, 0, num_blocks=1, block_size=16)


def test_a_budget_too_small_names_each_stage_its_node_and_the_bytes_missing():
    stages = split_layers(CFG, torch.float32, 2, num_blocks=4, block_size=16, by="bytes")
    roomy = Place("node-a", "cpu", stages[0].bytes)
    check_budgets(stages, [roomy, Place("node-b", "cpu", stages[1].bytes)])
    tight = Place("node-b", "cpu", stages[1].bytes - 1000)
    with pytest.raises(QuotaExceeded) as e:
        check_budgets(stages, [roomy, tight])
    assert "stage 1 (layers 15-29)" in str(e.value) and "node-b" in str(e.value)
    assert "1000 bytes missing" in str(e.value) and "stage 0" not in str(e.value)


def _heaviest(n: int, by: str = "bytes") -> int:
    return max(s.bytes for s in split_layers(CFG, torch.float32, n, 10, 16, by))


def test_auto_placement_takes_the_fewest_stages_that_fit():
    from llmos_kernel.placement import choose_stages

    whole = _heaviest(1)
    assert len(choose_stages(CFG, torch.float32, 10, 16, [whole, 1])) == 1
    # the whole model fits no place, halves fit two: two stages
    two = choose_stages(CFG, torch.float32, 10, 16, [whole - 1, _heaviest(2), 5])
    assert len(two) == 2 and max(s.bytes for s in two) <= _heaviest(2)
    # three places of a third each: three stages, not two (the second largest is too small)
    assert len(choose_stages(CFG, torch.float32, 10, 16, [_heaviest(3)] * 3)) == 3


def test_auto_placement_balances_work_where_it_fits_else_bytes():
    from llmos_kernel.placement import choose_stages

    by_work, by_bytes = _heaviest(2, "compute"), _heaviest(2)
    assert by_work > by_bytes  # the first stage holds the embedding and more layers
    roomy = choose_stages(CFG, torch.float32, 10, 16, [by_work, by_work])
    assert [s.layers for s in roomy] == [s.layers for s in
                                         split_layers(CFG, torch.float32, 2, 10, 16)]
    tight = choose_stages(CFG, torch.float32, 10, 16, [by_work - 1, by_work - 1])
    assert [s.layers for s in tight] == [s.layers for s in
                                         split_layers(CFG, torch.float32, 2, 10, 16, "bytes")]


def test_auto_placement_that_fits_nowhere_says_how_many_bytes_were_missing():
    from llmos_kernel.placement import choose_stages

    need = _heaviest(2)
    with pytest.raises(QuotaExceeded, match=rf"split into 2 stage\(s\).*{need - 1000} bytes "
                                            "missing"):
        choose_stages(CFG, torch.float32, 10, 16, [1000, 1000], "the cluster's nodes")
    with pytest.raises(QuotaExceeded, match="offers no place"):
        choose_stages(CFG, torch.float32, 10, 16, [])
