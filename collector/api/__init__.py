"""The HTTP API: the residents' page and its public figures, and the operators' endpoints (collector/api/app.py)."""
