"""The cell balance engine: interval energies and volumes from cumulative counters, the KWWK metrics of
each loop, roll-ups to hours, days and months, the alliance, and recomputation when late data arrives.
Definitions and storage schema: docs/balance.md.

Modules (import them directly; this package imports nothing, so `kwwk` stays light on a gateway):
spec (roles → series), counters (counter → interval quantities), rates (power/flow → estimated
quantities), metrics (definitions), rows (storage rows, roll-ups), source/store (InfluxDB), memory
(in-memory fakes), engine (recompute), trigger (late data), alliance (cells side by side), wiring
(the engine on InfluxDB), cli (`kwwk balance`).
"""
