"""Checkpoints on disk: the native (original package) layout, PEFT's, conversion, atomic writes."""
