# One image for every central service (collector, API) and for the demo's simulator and gateways.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY edge edge
COPY gateway gateway
COPY collector collector
COPY dashboards dashboards
COPY kwwk kwwk
RUN pip install --no-cache-dir '.[gateway,collector]'
COPY firmware_configs firmware_configs
RUN useradd --system --uid 10001 kwwk && mkdir /data && chown kwwk /data
USER kwwk
ENTRYPOINT ["kwwk"]
