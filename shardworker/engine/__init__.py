"""The worker's engine: many folder sessions multiplexed on one selector loop."""
