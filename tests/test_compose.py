"""docker-compose.yml cannot run here (no Docker engine): check that it is complete and consistent."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
#: run-time state the operator generates before `docker compose up` (git-ignored, documented in README)
GENERATED = ("./var/",)


def _bind_sources() -> list[tuple[str, str]]:
    out = []
    for name, svc in COMPOSE["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith("."):
                out.append((name, source))
    for name, secret in COMPOSE.get("secrets", {}).items():
        out.append((f"secret {name}", secret["file"]))
    return out


def test_every_mounted_file_exists() -> None:
    missing = [(svc, src) for svc, src in _bind_sources()
               if not src.startswith(GENERATED) and not (ROOT / src).exists()]
    assert not missing, f"compose mounts files the repository does not have: {missing}"


def test_generated_files_are_ignored_run_time_state() -> None:
    generated = [src for _, src in _bind_sources() if src.startswith(GENERATED)]
    ignore = (ROOT / ".gitignore").read_text().split()
    assert all(any(src.removeprefix("./").startswith(i.rstrip("/")) for i in ignore) for src in generated)
    readme = (ROOT / "README.md").read_text()
    for folder in {str(Path(src.removeprefix("./")).parent) + "/" for src in generated}:
        assert folder in readme, f"README does not say how {folder} is filled"


def test_build_context_and_dockerfile_exist() -> None:
    for name, svc in COMPOSE["services"].items():
        if "build" in svc:
            build = svc["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for src in line.split()[1:-1]:
                        assert (context / src).exists(), f"Dockerfile copies {src}, which does not exist"


def test_services_of_the_data_path_are_there() -> None:
    services = COMPOSE["services"]
    assert {"mosquitto", "influxdb", "grafana", "collector", "api"} <= set(services)
    demo = {n for n, s in services.items() if "demo" in s.get("profiles", [])}
    assert {"sim", "gateway-musterdorf", "gateway-lindenau"} <= demo
    assert services["grafana"]["image"].startswith("grafana/grafana:11")
    assert services["influxdb"]["image"].startswith("influxdb:2")


def test_commands_name_real_subcommands_and_cells() -> None:
    from typer.main import get_command

    from kwwk.cli import app

    cli = get_command(app)
    for name, svc in COMPOSE["services"].items():
        cmd = svc.get("command")
        if not cmd or svc.get("image", "").split(":")[0] != "kwwk-telemetry":
            continue
        group = cli.commands[cmd[0]]  # type: ignore[attr-defined]
        sub = group.commands[cmd[1]] if hasattr(group, "commands") else group
        opts = {o for p in sub.params for o in getattr(p, "opts", [])}
        for arg in cmd[2:]:
            if arg.startswith("--"):
                assert arg in opts, f"{name}: {' '.join(cmd[:2])} has no option {arg}"
            elif arg.startswith("firmware_configs/"):
                assert (ROOT / arg).exists(), f"{name}: {arg} does not exist"


def test_mosquitto_keeps_what_collectors_have_not_acknowledged() -> None:
    conf = (ROOT / "firmware_configs/mosquitto/mosquitto.conf").read_text().splitlines()
    settings = dict(line.split(None, 1) for line in conf if line and not line.startswith("#") and " " in line)
    assert settings["persistence"] == "true"
    assert int(settings["max_queued_messages"]) >= 100_000
    assert settings["allow_anonymous"] == "false"


def test_grafana_provisioning_parses_and_points_at_mounted_folders() -> None:
    prov = ROOT / "dashboards/provisioning"
    ds = yaml.safe_load((prov / "datasources/influxdb.yaml").read_text())
    assert all(d["jsonData"]["version"] == "InfluxQL" for d in ds["datasources"])
    providers = yaml.safe_load((prov / "dashboards/kwwk.yaml").read_text())["providers"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in COMPOSE["services"]["grafana"]["volumes"] if v.startswith(".")}
    for p in providers:
        assert p["options"]["path"] in mounts, "the provider reads a folder compose does not mount"
        assert Path(ROOT / mounts[p["options"]["path"]]).is_dir()


def test_only_the_tls_listener_is_published_and_the_plain_one_stays_internal() -> None:
    """Gateways reach the broker over TLS (8883); plain MQTT (1883) is for the services on the compose network."""
    broker = COMPOSE["services"]["mosquitto"]
    published = {str(p["target"]) if isinstance(p, dict) else str(p).split("/")[0].rsplit(":", 1)[-1]
                 for p in broker.get("ports", [])}
    assert published == {"8883"}, f"the broker publishes {published} to the host"
    # compose appends security.conf (listeners, TLS, access control) to mosquitto.conf
    mounts = {v.split(":")[0]: v.split(":")[1] for v in broker["volumes"] if v.startswith("./")}
    assert mounts["./firmware_configs/mosquitto/security.conf"] in " ".join(broker["command"])
    assert mounts["./firmware_configs/mosquitto/mosquitto.conf"] in " ".join(broker["command"])
    security = [line.split() for line in (ROOT / "firmware_configs/mosquitto/security.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    listeners = [words[1] for words in security if words[0] == "listener"]
    assert listeners == ["1883", "8883"]
    # every listener makes the client id the username: nobody can take another account's session
    blocks = " ".join(" ".join(w) for w in security).split("listener ")[1:]
    assert all("use_username_as_clientid true" in b for b in blocks), blocks
    assert any(w[0] == "plugin" and w[1].endswith("mosquitto_dynamic_security.so") for w in security)
    # services reach the broker on the internal network, by its service name
    for name in ("collector", "api"):
        assert COMPOSE["services"][name]["environment"]["KWWK_MQTT_HOST"] == "mosquitto", name
