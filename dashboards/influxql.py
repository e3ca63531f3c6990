"""An InfluxQL query type for grafana-foundation-sdk, which ships none for InfluxDB.

Follows the SDK's own pattern for a data query (cog's `Dataquery` variant): a model with `to_json` and
`from_json`, a builder, and a `variant_config` registered with the SDK runtime under the datasource type
`influxdb`, so `Dashboard.from_json` turns the targets of an InfluxDB panel back into this model.

Only raw InfluxQL is written (`rawQuery: true`, the text in `query`); the visual editor's parts
(`select`, `groupBy`, `tags`) of a dashboard edited by hand are kept verbatim in `extra`, so reading and
writing such a dashboard loses nothing.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

__all__ = ["DATASOURCE_TYPE", "InfluxQL", "InfluxQLQuery", "ResultFormat", "register", "variant_config"]

DATASOURCE_TYPE = "influxdb"
ResultFormat = Literal["time_series", "table", "logs"]

#: JSON key → attribute, in the order Grafana writes them
_FIELDS: dict[str, str] = {
    "refId": "ref_id",
    "datasource": "datasource",
    "hide": "hide",
    "query": "query",
    "rawQuery": "raw_query",
    "resultFormat": "result_format",
    "alias": "alias",
    "policy": "policy",
    "measurement": "measurement",
    "orderByTime": "order_by_time",
    "limit": "limit",
    "slimit": "slimit",
    "tz": "tz",
}


class InfluxQLQuery(cogvariants.Dataquery):
    """One target of a panel on an InfluxDB datasource in InfluxQL mode (Grafana's `InfluxQuery`)."""

    ref_id: str
    datasource: dashboard.DataSourceRef | None
    hide: bool | None
    query: str | None
    raw_query: bool | None
    result_format: ResultFormat | None
    alias: str | None
    policy: str | None
    measurement: str | None
    order_by_time: str | None
    limit: str | None
    slimit: str | None
    tz: str | None
    extra: dict[str, Any]

    def __init__(self, ref_id: str = "", datasource: dashboard.DataSourceRef | None = None, hide: bool | None = None,
                 query: str | None = None, raw_query: bool | None = None, result_format: ResultFormat | None = None,
                 alias: str | None = None, policy: str | None = None, measurement: str | None = None,
                 order_by_time: str | None = None, limit: str | None = None, slimit: str | None = None,
                 tz: str | None = None, extra: dict[str, Any] | None = None) -> None:
        self.ref_id = ref_id
        self.datasource = datasource
        self.hide = hide
        self.query = query
        self.raw_query = raw_query
        self.result_format = result_format
        self.alias = alias
        self.policy = policy
        self.measurement = measurement
        self.order_by_time = order_by_time
        self.limit = limit
        self.slimit = slimit
        self.tz = tz
        self.extra = dict(extra or {})

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {"refId": self.ref_id}
        for key, attr in _FIELDS.items():
            value = getattr(self, attr)
            if key == "refId" or value is None:
                continue
            payload[key] = value.to_json() if isinstance(value, dashboard.DataSourceRef) else value
        for key, value in self.extra.items():
            payload.setdefault(key, value)
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> typing.Self:
        args: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            attr = _FIELDS.get(key)
            if attr is None:
                extra[key] = value
            elif key == "datasource" and isinstance(value, dict):
                args[attr] = dashboard.DataSourceRef.from_json(value)
            else:
                args[attr] = value
        return cls(**args, extra=extra)


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    """Builder of a raw InfluxQL target: `InfluxQL('SELECT … WHERE $timeFilter').ref_id('A')`."""

    _internal: InfluxQLQuery

    def __init__(self, query: str | None = None) -> None:
        self._internal = InfluxQLQuery(raw_query=True, result_format="time_series")
        if query is not None:
            self._internal.query = query

    def build(self) -> InfluxQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> typing.Self:
        self._internal.ref_id = ref_id
        return self

    def datasource(self, ref: dashboard.DataSourceRef) -> typing.Self:
        self._internal.datasource = ref
        return self

    def query(self, query: str) -> typing.Self:
        """Raw InfluxQL; Grafana substitutes $timeFilter, $__interval, $__interval_ms and template variables."""
        self._internal.query = query
        self._internal.raw_query = True
        return self

    def result_format(self, result_format: ResultFormat) -> typing.Self:
        self._internal.result_format = result_format
        return self

    def as_table(self) -> typing.Self:
        return self.result_format("table")

    def alias(self, alias: str) -> typing.Self:
        """Series name pattern: $tag_<key>, $col, $m (measurement)."""
        self._internal.alias = alias
        return self

    def hide(self, hide: bool) -> typing.Self:
        self._internal.hide = hide
        return self

    def tz(self, tz: str) -> typing.Self:
        self._internal.tz = tz
        return self


def variant_config() -> cogruntime.DataqueryConfig:
    return cogruntime.DataqueryConfig(identifier=DATASOURCE_TYPE, from_json_hook=InfluxQLQuery.from_json)


def register() -> None:
    """Teach the SDK runtime to read InfluxDB targets as InfluxQLQuery (idempotent)."""
    cogruntime.register_dataquery_variant(variant_config())
