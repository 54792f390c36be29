"""A simulated Asterisk (AMI on loopback TCP) and VICIdial's command sender, for tests and demo."""

from balancer.sim.cluster import SimCluster, serve_cluster
from balancer.sim.model import SimCarrier, SimChannel
from balancer.sim.sender import CommandSender
from balancer.sim.server import SimAsterisk
from balancer.sim.traffic import TrafficResult, run_traffic

__all__ = [
    "CommandSender",
    "SimAsterisk",
    "SimCarrier",
    "SimChannel",
    "SimCluster",
    "TrafficResult",
    "run_traffic",
    "serve_cluster",
]
