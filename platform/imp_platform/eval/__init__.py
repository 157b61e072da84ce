"""Held-out evaluation (zero-shot by text prompts, retrieval) and the PNG run report."""
