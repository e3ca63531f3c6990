"""`kwwk dashboards push` against a fake of Grafana's HTTP API.

No Grafana server can be installed on these machines (see /work/shared/reference/stack_notes.md), so this
is a small in-process FastAPI app, served over real HTTP by uvicorn, that implements the endpoints the push
uses with Grafana 11's semantics as documented: bearer-token auth (401), /api/folders (list, get, create;
409 for a duplicate title or uid), /api/dashboards/uid/{uid} (404 when missing; the stored JSON plus id and
version, meta.folderUid, meta.provisioned), /api/dashboards/db (400 for an unknown folder or a provisioned
dashboard, 412 on a version mismatch without overwrite, version + 1 on each save) and /api/search
(type, tag). What it cannot prove: that a real Grafana stores the JSON byte for byte as sent, which the
"unchanged" comparison relies on (Grafana's SQL store keeps the posted JSON and only sets id, uid, version).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from dashboards.cli import app
from dashboards.folders import FOLDERS, JSON_DIR, load_dir
from edge.sim.ports import reserve_port
from tests.helpers import LiveServer

TOKEN = "glsa_test_token"


class FakeGrafana:
    def __init__(self) -> None:
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []
        self._id = 0
        self.app = self._make_app()

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def add_dashboard(self, dashboard: dict[str, Any], folder_uid: str = "", provisioned: bool = False) -> None:
        self.dashboards[dashboard["uid"]] = {"dashboard": {**dashboard, "id": self.next_id(), "version": 1},
                                             "folderUid": folder_uid, "provisioned": provisioned}

    def _make_app(self) -> FastAPI:
        api = FastAPI()

        @api.middleware("http")
        async def auth(request: Request, call_next: Any) -> Any:
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return JSONResponse({"message": "Unauthorized"}, status_code=401)
            if request.method != "GET":
                self.writes.append(f"{request.method} {request.url.path}")
            return await call_next(request)

        @api.get("/api/folders")
        def folders() -> list[dict[str, Any]]:
            return [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()]

        @api.get("/api/folders/{uid}")
        def folder(uid: str) -> Any:
            if uid not in self.folders:
                return JSONResponse({"message": "folder not found", "status": "not-found"}, status_code=404)
            return self.folders[uid]

        @api.post("/api/folders")
        async def create_folder(request: Request) -> Any:
            body = await request.json()
            if any(f["title"] == body["title"] for f in self.folders.values()):
                return JSONResponse({"message": "a folder with the same name already exists"}, status_code=409)
            uid = body.get("uid") or f"f{self._id + 1}"
            if uid in self.folders:
                return JSONResponse({"message": "a folder with the same uid already exists"}, status_code=409)
            self.folders[uid] = {"id": self.next_id(), "uid": uid, "title": body["title"], "url": f"/dashboards/f/{uid}/"}
            return self.folders[uid]

        @api.get("/api/dashboards/uid/{uid}")
        def get_dashboard(uid: str) -> Any:
            d = self.dashboards.get(uid)
            if d is None:
                return JSONResponse({"message": "Dashboard not found"}, status_code=404)
            return {"dashboard": d["dashboard"],
                    "meta": {"folderUid": d["folderUid"], "provisioned": d["provisioned"], "canSave": True,
                             "version": d["dashboard"]["version"], "slug": d["dashboard"]["title"].lower()}}

        @api.post("/api/dashboards/db")
        async def save(request: Request) -> Any:
            body = await request.json()
            dash = body["dashboard"]
            if not dash.get("title"):
                return JSONResponse({"message": "Dashboard title cannot be empty"}, status_code=400)
            folder_uid = body.get("folderUid", "")
            if folder_uid and folder_uid not in self.folders:
                return JSONResponse({"message": "folder not found"}, status_code=400)
            old = self.dashboards.get(dash.get("uid", ""))
            if old is not None and old["provisioned"]:
                return JSONResponse({"message": "Cannot save provisioned dashboard"}, status_code=400)
            if old is not None and not body.get("overwrite") and dash.get("version") != old["dashboard"]["version"]:
                return JSONResponse({"message": "The dashboard has been changed by someone else",
                                     "status": "version-mismatch"}, status_code=412)
            version = old["dashboard"]["version"] + 1 if old else 1
            ident = old["dashboard"]["id"] if old else self.next_id()
            stored = {**json.loads(json.dumps(dash)), "id": ident, "version": version}
            self.dashboards[dash["uid"]] = {"dashboard": stored, "folderUid": folder_uid, "provisioned": False}
            return {"id": ident, "uid": dash["uid"], "url": f"/d/{dash['uid']}", "status": "success",
                    "version": version, "slug": dash["title"].lower(), "folderUid": folder_uid}

        @api.get("/api/search")
        def search(type: str = "", tag: list[str] | None = Query(None), limit: int = 1000,  # noqa: B008
                   ) -> list[dict[str, Any]]:
            out = []
            for uid, d in self.dashboards.items():
                tags = d["dashboard"].get("tags", [])
                if type not in ("", "dash-db") or (tag and not set(tag) <= set(tags)):
                    continue
                out.append({"uid": uid, "title": d["dashboard"]["title"], "type": "dash-db", "tags": tags,
                            "folderUid": d["folderUid"], "url": f"/d/{uid}"})
            return out[:limit]

        return api


@pytest.fixture
def grafana() -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana()
    with LiveServer(fake.app) as server:
        yield fake, server.url


def push(url: str, *args: str, token: str = TOKEN) -> Any:
    return CliRunner().invoke(app, ["push", "--url", url, *args], env={"KWWK_GRAFANA_TOKEN": token})


def test_first_push_creates_then_nothing_changes_then_one_edit_updates_one(grafana: tuple[FakeGrafana, str],
                                                                          tmp_path: Path) -> None:
    fake, url = grafana
    result = push(url)
    assert result.exit_code == 0, result.output
    files = load_dir(JSON_DIR)
    assert f"{len(files)} created, 0 updated, 0 unchanged" in result.output
    assert "folder created: KWWK Balance (kwwk-balance)" in result.output
    assert set(fake.folders) == {"kwwk-balance", "kwwk-operations"}
    for folder, board in files:
        stored = fake.dashboards[board["uid"]]
        assert stored["folderUid"] == FOLDERS[folder] and stored["dashboard"]["version"] == 1
        assert {k: v for k, v in stored["dashboard"].items() if k not in ("id", "version")} == board

    fake.writes.clear()
    result = push(url)
    assert result.exit_code == 0, result.output
    assert f"0 created, 0 updated, {len(files)} unchanged" in result.output
    assert fake.writes == []  # unchanged dashboards are not saved again: their version stays

    edited = tmp_path / "json"
    shutil.copytree(JSON_DIR, edited)
    path = edited / "KWWK Operations" / "kwwk-fleet.json"
    board = json.loads(path.read_text())
    board["refresh"] = "10s"
    path.write_text(json.dumps(board))
    result = push(url, "--dir", str(edited))
    assert result.exit_code == 0, result.output
    assert "updated: kwwk-fleet" in result.output and f"0 created, 1 updated, {len(files) - 1} unchanged" in result.output
    assert fake.dashboards["kwwk-fleet"]["dashboard"]["version"] == 2
    assert fake.writes == ["POST /api/dashboards/db"]


def test_dry_run_reports_without_writing(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    result = push(url, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "created: kwwk-fleet" in result.output and "dry run: nothing was changed" in result.output
    assert fake.writes == [] and not fake.dashboards and not fake.folders


def test_moved_provisioned_and_foreign_dashboards(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    files = {b["uid"]: (f, b) for f, b in load_dir(JSON_DIR)}
    # a folder of the same title made by hand: used, not duplicated
    fake.folders["abc123"] = {"id": 99, "uid": "abc123", "title": "KWWK Operations"}
    # the same fleet dashboard, but in the General folder: it must move (updated)
    fake.add_dashboard(files["kwwk-fleet"][1], folder_uid="")
    # a dashboard provisioned from files on that server: the API may not overwrite it
    fake.add_dashboard(files["kwwk-alliance"][1], folder_uid="kwwk-balance", provisioned=True)
    fake.add_dashboard({"uid": "old-cell", "title": "Old cell", "tags": ["kwwk", "balance"]})
    fake.add_dashboard({"uid": "someone-else", "title": "Not ours", "tags": ["weather"]})
    result = push(url)
    assert result.exit_code == 0, result.output
    assert "updated: kwwk-fleet" in result.output
    assert fake.dashboards["kwwk-fleet"]["folderUid"] == "abc123"
    assert "skipped (provisioned from files on the server): kwwk-alliance" in result.output
    assert "only on the server, tagged kwwk (left alone): old-cell" in result.output and "old-cell" in fake.dashboards
    assert "someone-else" not in result.output
    assert set(fake.folders) == {"abc123", "kwwk-balance"}


def test_refused_token_and_missing_token(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    result = push(url, token="wrong")
    assert result.exit_code == 2 and "refused the token (401)" in result.output
    result = CliRunner().invoke(app, ["push", "--url", url], env={"KWWK_GRAFANA_TOKEN": ""})
    assert result.exit_code == 2 and "no token" in result.output
    assert not fake.dashboards


def test_token_file_and_unreachable_grafana(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    result = CliRunner().invoke(app, ["push", "--url", f"http://127.0.0.1:{reserve_port()}", "--token-file", str(token)],
                                env={"KWWK_GRAFANA_TOKEN": ""})
    assert result.exit_code == 2 and "cannot reach Grafana" in result.output
