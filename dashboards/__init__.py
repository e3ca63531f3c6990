"""Grafana dashboards as code, generated from the cell registry, and their provisioning.

influxql   the InfluxQL query type the SDK lacks (a cog Dataquery variant for datasource type `influxdb`)
board      shared parts: datasource, panel ids and rows, targets and what each must return on real data
balance    per cell: loops, KWWK metrics, closure residuals (kwwk_balance); no variables: publicly shareable
devices    per cell: one row per device, its measurements by quantity, meter readings, readings per minute
fleet      every gateway: online, last seen, batches, sequence gaps, replays, outbox depth, read errors
alliance   the cells side by side, totals, per resident
units      profile units → Grafana units; thresholds
build      build everything, write dashboards/json/<folder>/<uid>.json
render     a target as Grafana sends it to InfluxDB (macros, interval, variables)
grafana    push to a Grafana over its HTTP API and report created / updated / unchanged
cli        `kwwk dashboards build` and `kwwk dashboards push`
"""
