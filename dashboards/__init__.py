"""Grafana dashboards as code, generated from the cell registry, and their provisioning."""
