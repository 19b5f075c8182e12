"""audience_svc: the relational store and targeting data plane of Carillon.

User-defined entity schemas (each entity a real table), versioned record ingestion, audience queries
compiled to one SQL statement pushed down to the database, and working sets: the population of one
run's targeting activity, materialized as a table, streamed in batches and purged after a retention
period.
"""

SERVICE_NAME = "audience"
DOMAIN = "audience.carillon.dev"
