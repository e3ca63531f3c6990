"""The collector's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CollectorMetrics"]


class CollectorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("kwwk_collector_messages_total", "Telemetry messages by outcome", ["result"], registry=r)
        self.readings = Counter("kwwk_collector_readings_total", "Readings by outcome", ["result"], registry=r)
        self.rejects = Counter("kwwk_collector_rejects_total", "Messages or readings dead-lettered, by reason",
                               ["reason"], registry=r)
        self.write_seconds = Histogram("kwwk_collector_write_seconds", "Latency of one database write",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.write_errors = Counter("kwwk_collector_write_errors_total", "Failed database writes", ["retryable"],
                                    registry=r)
        self.lag_seconds = Histogram("kwwk_collector_lag_seconds",
                                     "From the oldest reading of a message to its storage",
                                     buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400), registry=r)
        self.queue_depth = Gauge("kwwk_collector_queue_messages", "Messages received, not yet stored", registry=r)
        self.seq_gaps = Counter("kwwk_collector_sequence_gaps_total", "Sequence numbers found missing in storage, per gateway",
                                ["cell", "gateway"], registry=r)
        self.gaps_recovered = Counter("kwwk_collector_sequence_gaps_recovered_total",
                                      "Missing sequence numbers later filled by a resend", ["cell", "gateway"],
                                      registry=r)
        self.gaps_open = Gauge("kwwk_collector_sequence_gaps_open", "Sequence numbers still missing", registry=r)
        self.audit_up = Gauge("kwwk_collector_audit_up", "1 when the sequence audit can query the database",
                              registry=r)
        self.audit_alive = Gauge("kwwk_collector_audit_alive",
                                 "1 while the sequence audit completes its rounds (0: dead, failing or stalled)",
                                 registry=r)
        self.audit_last_round = Gauge("kwwk_collector_audit_last_round_timestamp_seconds",
                                      "When the sequence audit last completed a round", registry=r)
        self.audit_rounds = Counter("kwwk_collector_audit_rounds_total",
                                    "Sequence audit rounds by outcome (ok, no_database, skipped: no broker, failed)",
                                    ["result"], registry=r)
        self.seq_implausible = Counter("kwwk_collector_sequence_implausible_total",
                                       "Stored runs of missing sequence numbers too long to be real, not audited "
                                       "(implausible numbers refused at once are rejects, reason implausible_seq)",
                                       ["cell", "gateway"], registry=r)
        # the acking writer's own bound (collector/acking.py) and the database state it reports
        self.held_bytes = Gauge("kwwk_collector_held_bytes", "Payload bytes received, not yet acknowledged",
                                registry=r)
        self.held_peak = Gauge("kwwk_collector_held_messages_peak", "Most messages held at once since start",
                               registry=r)
        self.held_limit = Gauge("kwwk_collector_held_messages_limit", "Messages held before put() blocks",
                                registry=r)
        self.backpressure = Counter("kwwk_collector_backpressure_seconds",
                                        "Time the MQTT network thread waited for room (the broker held back)",
                                        registry=r)
        self.durable = Counter("kwwk_collector_deadletters_durable", "Dead letters kept in the local store",
                                   ["result"], registry=r)
        self.state = Gauge("kwwk_collector_database_state", "1 for the database's current state", ["state"],
                           registry=r)
        self.seq_duplicates = Counter("kwwk_collector_sequence_duplicates_total",
                                      "Repeated sequence numbers per gateway (redeliveries)", ["cell", "gateway"],
                                      registry=r)
        self.connected = Gauge("kwwk_collector_broker_connected", "1 while connected to the broker", registry=r)
        self.database_up = Gauge("kwwk_collector_database_up", "1 when the last write succeeded", registry=r)
