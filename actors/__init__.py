"""Ray actors that execute what the kernel decides: model shards and agent hosts."""
