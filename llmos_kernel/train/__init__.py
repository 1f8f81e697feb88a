"""Fine-tuning the Transformer core: LoRA training over dequantized frozen weights."""
