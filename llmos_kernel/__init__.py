"""llmos kernel: memory, scheduling, processes and the Transformer core."""
