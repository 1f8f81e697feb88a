"""``llmos serve``: the kernel behind an OpenAI-compatible HTTP API, metrics and a console."""
