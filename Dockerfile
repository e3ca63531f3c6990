# One image for every central service (collector, API, time beacon) and for the demo's simulator and gateways.
# The collector extra installs central/ (kwwk-telemetry-central: collector, dashboards, simulator, demo, broker
# tooling), built from the folders copied here; the root wheel alone is what a gateway gets.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY edge edge
COPY gateway gateway
COPY collector collector
COPY dashboards dashboards
COPY kwwk kwwk
COPY central central
RUN pip install --no-cache-dir '.[gateway,collector]'
COPY firmware_configs firmware_configs
RUN useradd --system --uid 10001 kwwk && mkdir /data && chown kwwk /data
USER kwwk
ENTRYPOINT ["kwwk"]
