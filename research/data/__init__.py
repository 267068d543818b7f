"""Text sources, tokenisation caches and deterministic batching."""
