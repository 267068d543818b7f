"""A small, complete JAX/Flax codebase for language-model research."""
