"""Tools to inspect trained models (embedding space)."""
