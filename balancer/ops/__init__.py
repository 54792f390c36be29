"""Running it: Prometheus metrics, the `check` probes, logging."""
