"""The Transformer core: GGUF loading, the model, tokenizer and sampler."""
