"""Pure Flax linen modules: nothing here knows about training."""
