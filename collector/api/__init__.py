"""The HTTP API: operators' endpoints and, later, the residents' public page."""
