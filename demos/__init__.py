"""Demo agent programs."""
