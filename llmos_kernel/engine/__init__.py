"""The LLM engine: sequences, KV blocks, the scheduler, the model runner and the step loop."""
