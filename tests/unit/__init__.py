"""Model-free unit tests: each component built directly, with small fakes for its neighbours.

A package so that names such as ``test_scheduler`` can mirror the integration tests in
``tests/`` without clashing with them.
"""
