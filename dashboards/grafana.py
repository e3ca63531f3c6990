"""Upload dashboards to a running Grafana over its HTTP API (httpx, service-account token), and say what
changed by comparing with what the server holds: created, updated, unchanged.

Endpoints (Grafana 11): GET /api/folders/{uid}, GET /api/folders, POST /api/folders, GET /api/search,
GET /api/dashboards/uid/{uid}, POST /api/dashboards/db.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from dashboards.folders import FOLDERS

__all__ = ["GrafanaError", "PushReport", "push"]

#: keys Grafana adds or manages itself; they do not make a dashboard different
_SERVER_KEYS = ("id", "version")


class GrafanaError(RuntimeError):
    pass


@dataclass
class PushReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: provisioned from files on that server: the API may not overwrite them
    provisioned: list[str] = field(default_factory=list)
    folders_created: list[str] = field(default_factory=list)
    #: dashboards tagged kwwk on the server that this push does not carry (left alone)
    only_on_server: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for label, items in (("created", self.created), ("updated", self.updated), ("unchanged", self.unchanged),
                             ("skipped (provisioned from files on the server)", self.provisioned),
                             ("folder created", self.folders_created),
                             ("only on the server, tagged kwwk (left alone)", self.only_on_server)):
            out += [f"{label}: {item}" for item in items]
        out.append(f"{len(self.created)} created, {len(self.updated)} updated, {len(self.unchanged)} unchanged"
                   + (f", {len(self.provisioned)} skipped" if self.provisioned else ""))
        return out


def _normalise(dashboard: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(dashboard)
    for key in _SERVER_KEYS:
        d.pop(key, None)
    return d


def _check(r: httpx.Response, what: str) -> httpx.Response:
    if r.status_code in (401, 403):
        raise GrafanaError(f"{what}: Grafana refused the token ({r.status_code}); a service-account token "
                           "with the Editor role (dashboards and folders write) is needed")
    if r.status_code >= 400:
        try:
            message = r.json().get("message", r.text)
        except ValueError:
            message = r.text
        raise GrafanaError(f"{what}: Grafana answered {r.status_code}: {message}")
    return r


def _ensure_folder(http: httpx.Client, key: str, report: PushReport, dry_run: bool) -> str:
    """The folder's uid on the server: ours if it exists, else one with the same title, else a new one."""
    uid, title = FOLDERS[key], key
    r = http.get(f"/api/folders/{uid}")
    if r.status_code == 200:
        return uid
    if r.status_code != 404:
        _check(r, f"folder {uid}")
    for f in _check(http.get("/api/folders"), "list folders").json():
        if f.get("title") == title:  # made by hand or by file provisioning: use it
            return str(f["uid"])
    report.folders_created.append(f"{title} ({uid})")
    if not dry_run:
        _check(http.post("/api/folders", json={"uid": uid, "title": title}), f"create folder {title!r}")
    return uid


def push(dashboards: Iterable[tuple[str, dict[str, Any]]], url: str, token: str, *, dry_run: bool = False,
         message: str = "kwwk dashboards push", transport: httpx.BaseTransport | None = None,
         timeout: float = 30.0) -> PushReport:
    """Create or update each (folder key, dashboard JSON) on the Grafana at `url`; unchanged ones are not
    written (their version stays). With dry_run, only compare."""
    report = PushReport()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport) as http:
        folder_uids: dict[str, str] = {}
        ours: set[str] = set()
        for key, dashboard in dashboards:
            uid = dashboard["uid"]
            ours.add(uid)
            if key not in folder_uids:
                folder_uids[key] = _ensure_folder(http, key, report, dry_run)
            folder_uid = folder_uids[key]
            r = http.get(f"/api/dashboards/uid/{uid}")
            if r.status_code == 404:
                state = "created"
            else:
                body = _check(r, f"dashboard {uid}").json()
                meta = body.get("meta", {})
                if meta.get("provisioned"):
                    report.provisioned.append(uid)
                    continue
                same = _normalise(body.get("dashboard", {})) == _normalise(dashboard)
                state = "unchanged" if same and meta.get("folderUid", "") == folder_uid else "updated"
            if state != "unchanged" and not dry_run:
                payload = {"dashboard": {**_normalise(dashboard), "id": None}, "folderUid": folder_uid,
                           "overwrite": True, "message": message}
                _check(http.post("/api/dashboards/db", json=payload), f"save dashboard {uid}")
            getattr(report, state).append(uid)
        found = _check(http.get("/api/search", params={"type": "dash-db", "tag": "kwwk", "limit": 5000}),
                       "search dashboards").json()
        report.only_on_server = sorted(str(d["uid"]) for d in found if d.get("uid") not in ours)
    return report
