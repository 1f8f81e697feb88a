"""Where a spawn may ask to run: malformed and unsatisfiable requests are refused with a
message naming what the nodes have, so a process is never left waiting for a host Ray
cannot place."""

from __future__ import annotations

import pytest

from llmos_kernel.cluster import Node, check_placement
from llmos_kernel.errors import InvalidArgument

NODES = [Node("a1b2c3d4e5f6" + "0" * 44, "10.0.0.1", {"CPU": 8.0, "memory": 1e10, "node_a": 1.0}),
         Node("ffeeddccbbaa" + "1" * 44, "10.0.0.2", {"CPU": 2.0, "GPU": 1.0, "node_b": 1.0})]


def test_nothing_asked_is_no_place_of_its_own():
    assert check_placement({}, None, []) == (False, None)


@pytest.mark.parametrize("resources,node", [
    ({"num_gpus": 1}, None), ({"node_b": 0.01}, None), ({"num_cpus": 8}, None),
    ({"num_cpus": 2, "num_gpus": 1}, None), ({}, "ffeedd"), ({"num_cpus": 1}, NODES[0].node_id),
    ({"num_gpus": 0}, None),
])
def test_a_request_some_node_meets_gets_a_host_of_its_own(resources, node):
    placed, full = check_placement(resources, node, NODES)
    assert placed is True
    assert full is None if node is None else full in {n.node_id for n in NODES}


@pytest.mark.parametrize("resources,node,message", [
    ([1], None, "resources must be a dict"),
    ({"num_gpus": -1}, None, r"resources\['num_gpus'\] must be a number >= 0"),
    ({"num_gpus": True}, None, "must be a number"),
    ({"num_gpus": "1"}, None, "must be a number"),
    ({"num_gpus": 2}, None, r"no node has GPU 2; nodes have: a1b2c3d4e5f6: CPU 8, .*GPU 1"),
    ({"num_cpus": 4, "num_gpus": 1}, None, "no node has CPU 4, GPU 1"),  # not one node
    ({"node_c": 1}, None, "no node has node_c 1"),
    ({"node_b": 1}, "a1b2c3", "no such node has node_b 1"),
    ({}, "nope00", r"no alive node has the id 'nope00'; nodes: a1b2c3d4e5f6 \(10.0.0.1\)"),
    ({}, "a", "no alive node has the id 'a'"),  # too short a prefix to name one
    ({}, 7, "node must be a Ray node id"),
])
def test_a_request_no_node_meets_is_refused_saying_what_there_is(resources, node, message):
    with pytest.raises(InvalidArgument, match=message):
        check_placement(resources, node, NODES)


def test_a_node_prefix_resolves_to_the_full_id():
    assert check_placement({}, "ffeedd", NODES) == (True, NODES[1].node_id)
    assert check_placement({"num_gpus": 1}, None, NODES) == (True, None)
