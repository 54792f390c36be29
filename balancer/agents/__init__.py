"""Which server an agent's phone logs into: the capacity choice, assign/drain, the login flags."""
