"""Base models: the embedded SmolLM2 default, dtype and 8/4-bit quantized loading."""
