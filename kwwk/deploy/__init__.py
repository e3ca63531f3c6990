"""Deployment tooling: broker password and ACL files from the cell registry. No service imports it."""
