"""The user's model folder: config, safetensors headers and weight sources, the meta model, tokenizer, MoE families, dequantization."""
