"""The daemon's HTTP side: /metrics, /api/status, the dashboard's event stream and its page."""
