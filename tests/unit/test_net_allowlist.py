"""The net.fetch allowlist: what an entry admits, what a spawn may ask for, and that a
child never reaches further than its parent."""

from __future__ import annotations

import pytest

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.net_allowlist import allows, check_allowlist, narrow


def test_entries_admit_what_they_name_and_nothing_else():
    rules = check_allowlist(["API.example.com", "localhost:8080", "*.example.org",
                             "[::1]:9000", "10.0.0.7"])
    assert allows(rules, "api.example.com", 443) and allows(rules, "api.example.com", 80)
    assert not allows(rules, "example.com", 443)
    assert not allows(rules, "api.example.com.evil.net", 443)
    assert allows(rules, "localhost", 8080) and not allows(rules, "localhost", 8081)
    assert allows(rules, "a.example.org", 443) and allows(rules, "b.a.example.org", 1)
    assert not allows(rules, "example.org", 443)  # the wildcard is subdomains only
    assert not allows(rules, "badexample.org", 443)
    assert allows(rules, "::1", 9000) and not allows(rules, "::1", 9001)
    assert allows(rules, "10.0.0.7", 5) and not allows(rules, "10.0.0.70", 5)
    assert not allows([], "localhost", 80)


@pytest.mark.parametrize("bad", [
    "http://example.com", "example.com/path", "user@example.com", "", "*", "*.", "a..b",
    "host:0", "host:70000", "exa mple.com", "**.example.com", 7,
])
def test_a_malformed_entry_is_refused_by_name(bad):
    with pytest.raises(InvalidArgument) as e:
        check_allowlist([bad])
    if isinstance(bad, str):
        assert repr(bad) in str(e.value) or "net must be" in str(e.value)


def test_not_a_list_or_too_long_is_refused():
    with pytest.raises(InvalidArgument):
        check_allowlist("example.com")
    with pytest.raises(InvalidArgument):
        check_allowlist([f"h{i}.example.com" for i in range(65)])
    assert check_allowlist(None) == []


def test_a_child_keeps_only_what_its_parent_reaches():
    parent = check_allowlist(["api.example.com", "localhost:8080", "*.example.org"])
    asked = check_allowlist(["api.example.com", "api.example.com:443", "localhost",
                             "localhost:8080", "x.example.org", "*.a.example.org",
                             "*.example.org", "*.org", "evil.net"])
    assert narrow(asked, parent) == ["*.a.example.org", "*.example.org", "api.example.com",
                                     "api.example.com:443", "localhost:8080", "x.example.org"]
    assert narrow(asked, []) == []
    # whatever narrow keeps, the parent reaches at every port the child's entry admits
    for entry in narrow(asked, parent):
        host = entry.split(":")[0].replace("*.", "zz.")
        for port in (1, 80, 443, 8080):
            if allows([entry], host, port):
                assert allows(parent, host, port), (entry, port)
