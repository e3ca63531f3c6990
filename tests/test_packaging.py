"""A gateway's install carries no central code: two distributions from this repository, checked as built.

`kwwk-telemetry` (the root) ships edge without its simulator, gateway and the kwwk command; `kwwk-telemetry-central`
(central/) ships the collector, dashboards, the simulator, the demo and the deployment tooling. Both wheels are
built here and unpacked into a folder that is the only place our packages can come from, which is what an
install into a fresh environment amounts to (the third-party packages come from this venv).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

CENTRAL_FOLDERS = ("collector/", "dashboards/", "edge/sim/", "kwwk/dev/", "kwwk/deploy/")
CENTRAL_MODULES = ("collector", "dashboards", "edge.sim", "kwwk.dev", "kwwk.deploy")
CENTRAL_THIRD_PARTY = ("fastapi", "uvicorn", "influxdb_client", "httpx", "grafana_foundation_sdk")
CENTRAL_REQUIREMENTS = {"fastapi", "uvicorn", "influxdb-client", "httpx", "grafana-foundation-sdk",
                        "kwwk-telemetry-central"}
PACKAGES = ("edge", "gateway", "kwwk", "collector", "dashboards")

# Run in a fresh interpreter (-I: no PYTHONPATH, no script folder) whose sys.path has the unpacked wheels in
# place of the working tree: import every module of the gateway, what `kwwk gateway run` and `kwwk commission`
# import, and report what got loaded and which commands the CLI offers.
PROBE = """
import importlib, json, pkgutil, sys
site, root = sys.argv[1], sys.argv[2]
sys.path[:] = [site] + [p for p in sys.path if p.rstrip("/") != root]
import gateway
for m in pkgutil.walk_packages(gateway.__path__, "gateway."):
    importlib.import_module(m.name)
from typer.main import get_command
import edge.obs, kwwk.cli
cli = get_command(kwwk.cli.app)
print(json.dumps({
    "modules": sorted(sys.modules),
    "files": {n: getattr(sys.modules[n], "__file__", None) for n in ("edge", "gateway", "kwwk", "kwwk.cli")},
    "commands": {name: sorted(getattr(cmd, "commands", {})) for name, cmd in cli.commands.items()},
}))
"""


def _build(project: Path, out: Path) -> Path:
    before = set(out.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(project)], check=True, capture_output=True, text=True, cwd=out)
    (wheel,) = set(out.glob("*.whl")) - before
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {"root": _build(ROOT, out), "central": _build(ROOT / "central", out)}


def _files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if ".dist-info/" not in n}


def _requires(wheel: Path) -> dict[str, set[str]]:
    """Requirement names per extra ('' for the unconditional ones)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    out: dict[str, set[str]] = {"": set()}
    for extra in msg.get_all("Provides-Extra") or []:
        out[extra] = set()
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        for extra in out:
            if req.marker is None and extra == "" or req.marker is not None and extra and \
                    req.marker.evaluate({"extra": extra}):
                out[extra].add(req.name)
    return out


def _unpack(tmp_path: Path, *wheel_paths: Path) -> Path:
    site = tmp_path / "site"
    for wheel in wheel_paths:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return site


def _probe(site: Path, cwd: Path) -> dict:
    run = subprocess.run([sys.executable, "-I", "-c", PROBE, str(site), str(ROOT)], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_the_gateway_wheel_has_no_central_file_and_the_central_wheel_has_them(wheels: dict[str, Path]) -> None:
    root, central = _files(wheels["root"]), _files(wheels["central"])
    assert not [f for f in root if f.startswith(CENTRAL_FOLDERS)]
    assert {f.split("/")[0] for f in root} == {"edge", "gateway", "kwwk"}
    assert {"kwwk/cli.py", "gateway/service.py", "edge/profiles/eastron_sdm630.yaml"} <= root
    assert all(f.startswith(CENTRAL_FOLDERS) for f in central), sorted(central)
    assert all(any(f.startswith(folder) for f in central) for folder in CENTRAL_FOLDERS)
    # together the two wheels ship every file of the working tree's packages, each once
    tree = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert not root & central
    assert tree - root - central == set()
    assert "collector/api/static/index.html" in central


def test_the_gateway_extra_requires_nothing_central(wheels: dict[str, Path]) -> None:
    root = _requires(wheels["root"])
    assert root["gateway"] == {"aiomqtt", "paho-mqtt"}
    assert not (root[""] | root["gateway"]) & CENTRAL_REQUIREMENTS
    assert root["collector"] == root["dashboards"] == {"kwwk-telemetry-central"}
    assert "kwwk-telemetry-central" not in root["dev"], "dev works from the working tree, not a central copy"


def test_the_dev_extra_lists_every_central_dependency(wheels: dict[str, Path]) -> None:
    """The root's dev extra repeats central/'s third-party list (see pyproject.toml): the copies stay equal."""
    central, root = _requires(wheels["central"]), _requires(wheels["root"])
    assert central[""] - {"kwwk-telemetry"} | central["dashboards"] <= root["dev"]
    assert central[""] >= {"fastapi", "uvicorn", "influxdb-client", "httpx", "paho-mqtt"}


def test_a_gateway_install_loads_nothing_central(wheels: dict[str, Path], tmp_path: Path) -> None:
    site = _unpack(tmp_path, wheels["root"])
    found = _probe(site, tmp_path)
    assert all(path.startswith(str(site)) for path in found["files"].values()), found["files"]
    loaded = [m for m in found["modules"]
              if any(m == c or m.startswith(c + ".") for c in CENTRAL_MODULES + CENTRAL_THIRD_PARTY)]
    assert loaded == []
    assert {"gateway", "commission"} <= set(found["commands"])
    assert not set(found["commands"]) & {"sim", "collector", "api", "balance", "broker", "dashboards"}
    assert found["commands"]["gateway"] == ["run"]
    assert {"scan", "probe", "verify"} <= set(found["commands"]["commission"])


def test_a_gateway_install_offers_only_gateway_and_commission(wheels: dict[str, Path], tmp_path: Path) -> None:
    found = _probe(_unpack(tmp_path, wheels["root"]), tmp_path)
    assert set(found["commands"]) == {"gateway", "commission"}


def test_the_image_install_runs_every_compose_command(wheels: dict[str, Path], tmp_path: Path) -> None:
    """The Dockerfile's `pip install '.[gateway,collector]'` gets both wheels: every command compose runs is there,
    served from the installed files."""
    site = _unpack(tmp_path, wheels["root"], wheels["central"])
    found = _probe(site, tmp_path)
    assert all(path.startswith(str(site)) for path in found["files"].values()), found["files"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    used = {tuple(s["command"][:2]) for s in compose["services"].values()
            if s.get("image", "").startswith("kwwk-telemetry") and s.get("command")}
    assert {("collector", "run"), ("api", "run"), ("sim", "run"), ("gateway", "run"), ("broker", "beacon")} <= used
    for group, sub in used:
        assert sub in found["commands"].get(group, []), f"the image has no `kwwk {group} {sub}`"
    assert "token" in found["commands"]["api"]


def test_the_dev_install_imports_every_package_from_the_working_tree(tmp_path: Path) -> None:
    """`pip install -e '.[dev]'` puts the checkout on sys.path and installs no copy that would shadow it for the
    services the tests start (`.venv/bin/kwwk collector run`)."""
    code = ("import json, collector, dashboards, edge.sim, gateway, kwwk.cli, kwwk.deploy, kwwk.dev; "
            "print(json.dumps({m: sys.modules[m].__file__ for m in "
            "('collector', 'dashboards', 'edge.sim', 'gateway', 'kwwk.cli', 'kwwk.deploy', 'kwwk.dev')}))")
    run = subprocess.run([sys.executable, "-I", "-c", "import sys; " + code], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    files = json.loads(run.stdout)
    assert all(Path(f).is_relative_to(ROOT) for f in files.values()), files
