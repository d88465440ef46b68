"""Backend scoring and model training (the inference process)."""
