"""The central side: ingest from the broker, store in InfluxDB, compute balances, serve the API."""
