"""The live view every job reads: the server registry, channel tracker, health, status view."""
