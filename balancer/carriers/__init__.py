"""Which carrier each call takes: route matching and breakers, carrier health, per-call failover."""
