"""How a run reports: plots of its metrics (and, per ../shared/ARCHITECTURE.md, the metric sinks)."""
