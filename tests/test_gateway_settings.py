"""One resolution of the gateway's settings: `kwwk gateway run` and `kwwk commission verify` connect to the same
broker, as the same account, under the same client id, with the same outbox, from the same cell file, environment
and flags. Precedence: command line > environment > env file > cell config > default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge.cell import CellConfig, load_cell
from edge.errors import SettingsError
from gateway.settings import ENV, GatewayFlags, resolve
from kwwk.cli import app

NOWHERE = Path("/nonexistent/kwwk/gateway.env")


def cell(tmp_path: Path, mqtt: str = "", second: bool = False) -> CellConfig:
    def device(name: str) -> str:
        return f"devices: [{{id: {name}, profile: eastron_sdm630, connection: {{host: 127.0.0.1, port: 502}}}}]"
    gateways = f"  - id: gw-a\n    {mqtt}\n    {device('a')}\n" + (f"  - id: gw-b\n    {device('b')}\n" if second else "")
    path = tmp_path / "cell.yaml"
    path.write_text(f"cell: {{id: setdorf, name: Setdorf, location: {{latitude: 51, longitude: 9}}}}\n"
                    f"gateways:\n{gateways}")
    return load_cell(path)


def env_file(tmp_path: Path, **values: str) -> Path:
    path = tmp_path / "gateway.env"
    path.write_text("# /etc/kwwk/gateway.env\n" + "".join(f"{ENV[k]}={v}\n" for k, v in values.items()))
    return path


def broker(s: Any) -> tuple[Any, ...]:
    return s.gateway, s.mqtt.host, s.mqtt.port, s.mqtt.tls, s.mqtt.ca_file, s.username, s.client_id, str(s.outbox)


def test_defaults(tmp_path: Path) -> None:
    s = resolve(cell(tmp_path), environ={}, default_env_file=NOWHERE, pi_outbox=tmp_path / "no" / "outbox.sqlite")
    assert broker(s) == ("gw-a", "127.0.0.1", 1883, False, None, "gw-a", "kwwk-gw-gw-a", "var/gateway/gw-a.sqlite")
    assert s.password_file is None and s.mqtt.password is None and s.password_error is None
    assert s.mqtt.session_expiry_s == 7 * 86400 and not s.mqtt.clean_start  # resend requests survive an outage
    assert (s.health_port, s.log_level) == (9102, "INFO")
    assert s.sources["gateway"] == "the cell's only gateway" and s.sources["host"] == "default"
    # an installed Pi (systemd made /var/lib/kwwk) keeps its outbox there
    (tmp_path / "lib").mkdir()
    pi = resolve(cell(tmp_path), environ={}, default_env_file=NOWHERE, pi_outbox=tmp_path / "lib" / "outbox.sqlite")
    assert pi.outbox == tmp_path / "lib" / "outbox.sqlite"


def test_each_level_beats_the_next(tmp_path: Path) -> None:
    secret = tmp_path / "cell.password"
    secret.write_text("from-the-cell\n")
    cfg = cell(tmp_path, mqtt=f"mqtt: {{username: acct-cell, password_file: {secret}}}")
    kw: dict[str, Any] = {"default_env_file": NOWHERE, "pi_outbox": tmp_path / "no" / "o.sqlite"}

    s = resolve(cfg, environ={}, **kw)  # cell config over default
    assert (s.username, s.password_file, s.mqtt.password) == ("acct-cell", str(secret), "from-the-cell")
    assert s.sources["username"].startswith("cell config")

    file = env_file(tmp_path, host="file-host", tls="true", username="acct-file", outbox="/file/outbox.sqlite",
                    ca_file="/file/ca.crt", health_port="9200")
    s = resolve(cfg, GatewayFlags(env_file=file), environ={}, **kw)  # env file over cell config and default
    assert broker(s) == ("gw-a", "file-host", 8883, True, "/file/ca.crt", "acct-file", "kwwk-gw-gw-a",
                         "/file/outbox.sqlite")
    assert s.sources["port"] == "default (TLS)" and s.sources["host"] == f"env file {file}" and s.health_port == 9200
    assert resolve(cfg, environ={}, **{**kw, "default_env_file": file}).mqtt.host == "file-host"  # found by default

    environ = {ENV["host"]: "env-host", ENV["port"]: "18883", ENV["username"]: "acct-env", ENV["tls"]: "no"}
    s = resolve(cfg, GatewayFlags(env_file=file), environ=environ, **kw)  # environment over env file
    assert broker(s)[1:6] == ("env-host", 18883, False, "/file/ca.crt", "acct-env")
    assert s.sources["host"] == "environment"

    flags = GatewayFlags(env_file=file, mqtt_host="flag-host", mqtt_port=1, mqtt_tls=True, mqtt_username="acct-flag",
                         outbox=Path("/flag/o.sqlite"), mqtt_password_file=str(tmp_path / "missing"))
    s = resolve(cfg, flags, environ=environ, **kw)  # command line over everything
    assert broker(s) == ("gw-a", "flag-host", 1, True, "/file/ca.crt", "acct-flag", "kwwk-gw-gw-a", "/flag/o.sqlite")
    assert s.mqtt.password is None and "cannot read the password file" in (s.password_error or "")
    assert {k: v for k, v in s.sources.items() if v == "command line"}.keys() == {
        "host", "port", "tls", "username", "password_file", "outbox"}


def test_gateway_id_and_bad_values(tmp_path: Path) -> None:
    cfg = cell(tmp_path, second=True)
    kw: dict[str, Any] = {"default_env_file": NOWHERE}
    with pytest.raises(SettingsError, match="give --gateway .*gw-a, gw-b"):
        resolve(cfg, environ={}, **kw)
    assert resolve(cfg, environ={ENV["gateway"]: "gw-b"}, **kw).client_id == "kwwk-gw-gw-b"
    file = env_file(tmp_path, gateway="gw-b")
    assert resolve(cfg, GatewayFlags(gateway="gw-a", env_file=file), environ={}, **kw).gateway == "gw-a"
    assert resolve(cfg, GatewayFlags(env_file=file), environ={}, **kw).username == "gw-b"
    with pytest.raises(SettingsError, match="gw-x"):
        resolve(cfg, GatewayFlags(gateway="gw-x"), environ={}, **kw)
    with pytest.raises(SettingsError, match="KWWK_MQTT_PORT in the environment: 'eighty' is not a number"):
        resolve(cfg, GatewayFlags(gateway="gw-a"), environ={ENV["port"]: "eighty"}, **kw)
    with pytest.raises(SettingsError, match=r"KWWK_MQTT_TLS in the env file .*'maybe' is not a yes/no"):
        resolve(cfg, GatewayFlags(gateway="gw-a", env_file=env_file(tmp_path, tls="maybe")), environ={}, **kw)
    with pytest.raises(SettingsError, match="does not exist"):
        resolve(cfg, GatewayFlags(gateway="gw-a", env_file=tmp_path / "nope.env"), environ={}, **kw)
    blank = resolve(cfg, GatewayFlags(gateway="gw-a"), environ={ENV["host"]: "  ", ENV["ca_file"]: ""}, **kw)
    assert blank.mqtt.host == "127.0.0.1" and blank.mqtt.ca_file is None  # an empty KWWK_MQTT_CA= is unset


def _print(*args: str, env: dict[str, str]) -> dict[str, Any]:
    unset: dict[str, str | None] = dict.fromkeys(ENV.values())
    result = CliRunner().invoke(app, [*args, "--print-settings"], env={**unset, **env})
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("case", ["env file only", "env over file", "flags over env", "cell config"])
def test_gateway_run_and_commission_verify_resolve_the_same(tmp_path: Path, case: str) -> None:
    secret = tmp_path / "gw.password"
    secret.write_text("pw\n")
    cfg = cell(tmp_path, mqtt=f"mqtt: {{username: acct-cell, password_file: {secret}}}", second=True)
    file = env_file(tmp_path, gateway="gw-a", host="broker.example", tls="true", ca_file="/etc/kwwk/ca.crt",
                    outbox=str(tmp_path / "outbox.sqlite"), **({} if case == "cell config" else {"username": "gw-a"}))
    env = {"env over file": {ENV["port"]: "18883", ENV["host"]: "env-host"},
           "flags over env": {ENV["port"]: "18883", ENV["tls"]: "false"}}.get(case, {})
    flags = ["--mqtt-host", "flag-host", "--no-mqtt-tls", "--outbox", str(tmp_path / "flag.sqlite"),
             "--gateway", "gw-b"] if case == "flags over env" else []
    common = ["--cell", str(cfg.source), "--env-file", str(file), *flags]
    run = _print("gateway", "run", *common, env=env)
    verify = _print("commission", "verify", *common, env=env)
    assert run == verify
    expected = resolve(cfg, GatewayFlags(env_file=file), environ=env).as_dict() if not flags else None
    want = {
        "env file only": ("gw-a", "broker.example", 8883, True, "gw-a", "kwwk-gw-gw-a", str(tmp_path / "outbox.sqlite")),
        "env over file": ("gw-a", "env-host", 18883, True, "gw-a", "kwwk-gw-gw-a", str(tmp_path / "outbox.sqlite")),
        # the env file's account stays: it outranks the cell config, whichever gateway the flag picks
        "flags over env": ("gw-b", "flag-host", 18883, False, "gw-a", "kwwk-gw-gw-b", str(tmp_path / "flag.sqlite")),
        "cell config": ("gw-a", "broker.example", 8883, True, "acct-cell", "kwwk-gw-gw-a",
                        str(tmp_path / "outbox.sqlite")),
    }[case]
    got = tuple(run[k] for k in ("gateway", "host", "port", "tls", "username", "client_id", "outbox"))
    assert got == want
    assert run["password_file"] == (str(secret) if case != "flags over env" else None)  # gw-b has no mqtt section
    assert run["password_read"] is (case != "flags over env") and "pw" not in json.dumps(run)
    if expected is not None:
        assert run == expected


def test_verify_refuses_what_gateway_run_refuses(tmp_path: Path) -> None:
    cfg = cell(tmp_path, second=True)
    for cmd in (("gateway", "run"), ("commission", "verify")):
        result = CliRunner().invoke(app, [*cmd, "--cell", str(cfg.source), "--env-file", str(tmp_path / "none"),
                                          "--print-settings"], env=dict.fromkeys(ENV.values()))
        assert result.exit_code == 2 and "environment file" in result.output and "does not exist" in result.output
        result = CliRunner().invoke(app, [*cmd, "--cell", str(cfg.source), "--print-settings"],
                                    env={**dict.fromkeys(ENV.values()), ENV["port"]: "x"})
        assert result.exit_code == 2 and "give --gateway" in result.output


def test_the_shipped_env_file_gives_a_tls_gateway() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_cell(root / "firmware_configs" / "cells" / "musterdorf.yaml")
    example = root / "firmware_configs" / "pi" / "gateway.env.example"
    s = resolve(cfg, GatewayFlags(env_file=example), environ={})
    assert broker(s) == ("gw-musterdorf-1", "broker.example.org", 8883, True, "/etc/kwwk/ca.crt", "gw-musterdorf-1",
                         "kwwk-gw-gw-musterdorf-1", "/var/lib/kwwk/outbox.sqlite")
    assert s.password_file == "/etc/kwwk/mqtt-password" and (s.health_port, s.log_level) == (9102, "INFO")
    assert set(s.sources.values()) >= {f"env file {example}"}


def test_both_commands_name_every_variable_in_their_help() -> None:
    for cmd in (("gateway", "run"), ("commission", "verify")):
        result = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        missing = [v for k, v in ENV.items() if f"env {v}" not in result.output
                   and not (cmd[0] == "commission" and k in ("health_port", "log_level"))]
        assert not missing, f"{' '.join(cmd)} --help does not name {missing}"


@pytest.mark.integration
def test_gateway_run_and_verify_use_the_env_file_against_a_real_broker(tmp_path: Path) -> None:
    """Not only the printout: `gateway run` logs in with the env file's account, port and password file and keeps
    its outbox where the file says; `commission verify` with the same file logs in to the same broker likewise."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import paho.mqtt.client as mqtt

    from edge.messages import StatusMessage
    from edge.mqtt import MqttSettings, connect_kwargs, paho_client
    from edge.sim.ports import reserve_port
    from edge.telemetry import status_topic
    from kwwk.deploy.broker import write_broker_files
    from kwwk.dev.localservers import Mosquitto

    kwwk = str(Path(sys.executable).parent / "kwwk")
    path = tmp_path / "cell.yaml"  # a meter nobody answers for: the uplink runs all the same
    path.write_text("cell: {id: setdorf, name: Setdorf, location: {latitude: 51, longitude: 9}}\ngateways:\n"
                    "  - id: gw-a\n    mqtt: {username: acct-a}\n    devices: [{id: grid, profile: eastron_sdm630, "
                    f"connection: {{host: 127.0.0.1, port: {reserve_port()}}}}}]\n")
    cfg = load_cell(path)
    files = write_broker_files({"setdorf": cfg}, tmp_path / "broker", tmp_path / "secrets")
    outbox = tmp_path / "state" / "outbox.sqlite"
    with Mosquitto(tmp_path / "mosquitto", anonymous=False,
                   extra=f"password_file {files.password_file}\nacl_file {files.acl_file}") as server:
        file = env_file(tmp_path, port=str(server.port), password_file=str(tmp_path / "secrets" / "acct-a.password"),
                        outbox=str(outbox), health_port="0")
        seen: list[StatusMessage] = []
        got = threading.Condition()

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            with got:
                seen.append(StatusMessage.parse(msg.payload))
                got.notify_all()

        collector = paho_client(MqttSettings(port=server.port, username="collector",
                                             password=(tmp_path / "secrets" / "collector.password").read_text().strip()))
        collector.on_message = on_message
        collector.on_connect = lambda c, *_: c.subscribe(status_topic("setdorf", "gw-a"), qos=1)
        collector.connect(**connect_kwargs(MqttSettings(port=server.port)))
        collector.loop_start()
        env = {"PATH": os.environ["PATH"], "COLUMNS": "250"}
        log = (tmp_path / "gateway.log").open("w")
        proc = subprocess.Popen([kwwk, "gateway", "run", "--cell", str(path), "--env-file", str(file)],  # noqa: S603
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with got:
                assert got.wait_for(lambda: any(s.state == "online" for s in seen), 30), (tmp_path / "gateway.log").read_text()
            online = next(s for s in seen if s.state == "online")
            assert (online.cell, online.gateway) == ("setdorf", "gw-a") and online.outbox_readings is not None
            assert outbox.exists()  # where the env file put it, not var/gateway/
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            with got:
                assert got.wait_for(lambda: seen[-1].state == "offline", 10), seen
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            collector.disconnect()
            collector.loop_stop()
            log.close()
        res = subprocess.run([kwwk, "commission", "verify", "--cell", str(path), "--env-file", str(file),  # noqa: S603
                              "--allow-plain", "--pause", "0", "--beacon-wait", "0.2", "--service-user", "nobody-here",
                              "--report-dir", str(tmp_path / "reports")], env=env, capture_output=True, text=True,
                             timeout=120, check=False)
        assert res.returncode == 1, res.stdout + res.stderr  # the meter does not answer
        out = " ".join(res.stdout.split())
        assert f"logged in to 127.0.0.1:{server.port} over plain MQTT (allowed by --allow-plain) as 'acct-a'" in out
        assert "may publish to its status topic" in out
        (report,) = (tmp_path / "reports").glob("*.md")
        assert str(outbox) in report.read_text()  # verify checked the outbox the gateway used
