"""The gateway's Prometheus metrics, in one registry per gateway process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GatewayMetrics"]


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reads = Counter("kwwk_gateway_reads_total", "Device reads by result", ["device", "result"], registry=r)
        self.read_errors = Counter("kwwk_gateway_read_errors_total", "Failed device reads by reason",
                                   ["device", "reason"], registry=r)
        self.requests = Counter("kwwk_gateway_modbus_requests_total", "Modbus requests sent", ["device"], registry=r)
        self.readings = Counter("kwwk_gateway_readings_total", "Readings stored in the outbox", ["quality"], registry=r)
        self.poll_duration = Histogram("kwwk_gateway_poll_seconds", "Time to read one device", ["device"],
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.poll_lateness = Histogram("kwwk_gateway_poll_lateness_seconds", "How late a poll started vs schedule",
                                       ["device"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                                            0.25, 0.5, 1, 5), registry=r)
        self.polls_skipped = Counter("kwwk_gateway_polls_skipped_total",
                                     "Polls skipped because the previous one overran", ["device"], registry=r)
        self.outbox_depth = Gauge("kwwk_gateway_outbox_readings", "Readings waiting in the outbox", registry=r)
        self.outbox_oldest_age = Gauge("kwwk_gateway_outbox_oldest_age_seconds",
                                       "Age of the oldest reading in the outbox", registry=r)
        self.outbox_in_ram = Gauge("kwwk_gateway_outbox_ram_readings",
                                   "Readings held only in RAM, waiting for the broker's PUBACK (within the write window)",
                                   registry=r)
        self.outbox_disk_bytes = Gauge("kwwk_gateway_outbox_disk_bytes",
                                       "Bytes the outbox has on disk (database, WAL, .seq file)", registry=r)
        self.outbox_commits = Counter("kwwk_gateway_outbox_commits_total", "Group commits to the SD card", registry=r)
        self.outbox_committed = Counter("kwwk_gateway_outbox_committed_readings_total",
                                        "Readings written to the SD card, by why (window: not acknowledged in "
                                        "time; offline: broker unreachable or stopping)", ["why"], registry=r)
        self.outbox_errors = Counter("kwwk_gateway_outbox_write_errors_total",
                                     "Disk writes the outbox could not make (a full or failing card), retried",
                                     registry=r)
        self.outbox_archive = Gauge("kwwk_gateway_outbox_archived_batches",
                                    "Acknowledged batches kept in RAM for resend requests", registry=r)
        self.outbox_archive_bytes = Gauge("kwwk_gateway_outbox_archive_bytes",
                                          "Compressed bytes of the archive of acknowledged batches", registry=r)
        self.outbox_dropped = Counter("kwwk_gateway_outbox_dropped_total",
                                      "Readings dropped by the outbox overflow policy", ["reason"], registry=r)
        self.published = Counter("kwwk_gateway_published_batches_total", "Batches acknowledged by the broker",
                                 ["replay"], registry=r)
        self.published_readings = Counter("kwwk_gateway_published_readings_total",
                                          "Readings acknowledged by the broker", registry=r)
        self.refused = Counter("kwwk_gateway_publish_refused_total",
                               "Publishes the broker refused (PUBACK reason code >= 0x80)", ["reason"], registry=r)
        self.resent = Counter("kwwk_gateway_resent_batches_total", "Archived batches sent again on request",
                              registry=r)
        self.resend_missing = Counter("kwwk_gateway_resend_missing_total",
                                      "Resend requests for batches no longer kept", registry=r)
        self.last_puback = Gauge("kwwk_gateway_last_puback_timestamp_seconds", "Time of the last PUBACK", registry=r)
        self.connected = Gauge("kwwk_gateway_broker_connected", "1 while connected to the broker", registry=r)
        self.connects = Counter("kwwk_gateway_broker_connects_total", "Broker connection attempts by result",
                                ["result"], registry=r)

    def read_errors_total(self) -> int:
        """Failed device reads since this process started, over all devices and reasons."""
        return int(sum(s.value for m in self.read_errors.collect() for s in m.samples if s.name.endswith("_total")))
