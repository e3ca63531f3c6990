"""Development tooling: the local demo, local servers for tests, simulated history. No service imports it."""
