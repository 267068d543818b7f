"""Training: optimiser, the shared step loop, and one objective per stage."""
