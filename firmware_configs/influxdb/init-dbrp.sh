#!/bin/bash
# InfluxDB 2.x first-start hook: map the v1 database "kwwk" to the bucket, so every InfluxQL
# query of the API and the dashboards runs unchanged on 1.x and 2.x.
set -euo pipefail
bucket_id=$(influx bucket list --name "${DOCKER_INFLUXDB_INIT_BUCKET}" --hide-headers | cut -f1)
influx v1 dbrp create --db kwwk --rp autogen --bucket-id "${bucket_id}" --default
