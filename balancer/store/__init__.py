"""Live state: per-server channels, counts and health, in Redis or in process (`factory`)."""
