"""vici-balancer: a cluster balancer for VICIdial."""

__version__ = "0.1.0"
