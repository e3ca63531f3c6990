"""The `kwwk` command, the local demo, and what every service shares: logs, health and metrics."""
