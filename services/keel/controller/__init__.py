"""The driver: places the role actors, runs the loop, publishes weights, logs metrics."""
