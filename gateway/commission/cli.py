"""`kwwk commission` subcommands: scan a bus, probe a device, verify a gateway and write its report.

    kwwk commission scan --serial-port /dev/ttyUSB0            # finds baud rate, parity, unit ids, profiles
    kwwk commission scan --host 192.168.1.50                   # a Modbus TCP device or gateway
    kwwk commission probe --host 192.168.1.50 --unit 1 --profile carlo_gavazzi_em24_e1
    kwwk commission verify --cell /etc/kwwk/cell.yaml --gateway gw-musterdorf-1
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.errors import cli_errors, fail
from gateway import settings as gs  # the gateway's options: `gateway run` and `commission verify` share them

app = typer.Typer(help="Commissioning on site: scan a bus, probe a device, verify a gateway, write a report.",
                  no_args_is_help=True, epilog="Example: kwwk commission scan --host 192.168.1.50")

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _quiet_libraries() -> None:
    """The commands report every failure themselves; the libraries' own logs would only repeat them."""
    for name in ("pymodbus", "edge.modbus"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class _RichProgress:
    """ScanProgress on a rich progress bar (on stderr, so stdout keeps only the table and the YAML)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None
        self.total = 0

    def start(self, label: str, total: int) -> None:
        if self.task is not None:  # an earlier phase that stopped early (a setting that answered) is done
            self.progress.update(self.task, completed=self.total)
        self.total = max(total, 1)
        self.task = self.progress.add_task(label, total=self.total, found=0)

    def advance(self, found: int) -> None:
        self.progress.update(self.task, advance=1, found=found)


# ---------------------------------------------------------------------------------------------- scan

@app.command("scan", epilog="Example: kwwk commission scan --serial-port /dev/ttyUSB0 --yaml-out devices.yaml   "
                            "(or: kwwk commission scan --host 192.168.1.50)")
def scan(
    host: Annotated[str | None, typer.Option(help="Modbus TCP host (a device, or a TCP/RS-485 gateway)")] = None,
    port: Annotated[int, typer.Option(help="TCP port")] = 502,
    rtu_over_tcp: Annotated[bool, typer.Option(help="the host passes RTU frames through (transparent mode)")] = False,
    serial_port: Annotated[str | None, typer.Option(help="RS-485 adapter, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")]
    = None,
    baud: Annotated[list[int] | None, typer.Option(help="baud rate to try (repeat); default 9600 19200 38400 "
                                                        "115200 4800 2400")] = None,
    parity: Annotated[list[str] | None, typer.Option(help="parity to try: N, E or O (repeat); default all three")]
    = None,
    stopbits: Annotated[int, typer.Option(help="stop bits (1 or 2)")] = 1,
    units: Annotated[str, typer.Option(help="unit ids to scan, e.g. 1-247 or 1-10,247")] = "1-247",
    quick_units: Annotated[str, typer.Option(help="unit ids tried at each serial setting while looking for the "
                                                  "bus's baud rate and parity")] = "1-5,10,247",
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for each answer (default 0.2 serial, "
                                                       "0.5 TCP)")] = None,
    all_settings: Annotated[bool, typer.Option(help="scan every serial setting that answers, not only the first")]
    = False,
    thorough: Annotated[bool, typer.Option(help="scan the whole unit range at every serial setting (slow)")] = False,
    identify: Annotated[bool, typer.Option(help="name each device's profile")] = True,
    guess: Annotated[bool, typer.Option(help="when no identification registers match, list the profiles whose "
                                             "values are all plausible")] = True,
    yaml_out: Annotated[Path | None, typer.Option(help="also write the cell-config snippet to this file")] = None,
) -> None:
    """Find the devices on a serial bus or behind a TCP host and name their profiles.

    Every unit id gets one small read: any answer (data or a Modbus exception) means a device. Each
    device is then named from SunSpec discovery and the identification registers of the profiles,
    or else given a list of profiles whose values are plausible (a guess, to confirm with probe).
    Prints a table and a YAML snippet to paste into the gateway's entry of the cell config.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from edge.modbus import LineDown
    from gateway.commission.scan import (
        COMMON_BAUDRATES,
        COMMON_PARITIES,
        parse_units,
        scan_serial,
        scan_tcp,
        scan_yaml,
    )

    _quiet_libraries()
    if (host is None) == (serial_port is None):
        fail("give either --host (Modbus TCP) or --serial-port (RS-485)")
    try:
        unit_ids = parse_units(units)
        quick = parse_units(quick_units)
    except ValueError as err:
        fail(str(err))
    parities = [p.upper() for p in (parity or COMMON_PARITIES)]
    if any(p not in ("N", "E", "O") for p in parities) or stopbits not in (1, 2):
        fail("parity must be N, E or O and stopbits 1 or 2")
    err_console = Console(stderr=True)
    out = Console(soft_wrap=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("found {task.fields[found]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err_console, transient=False) as bar:
            progress = _RichProgress(bar)
            if host is not None:
                results = [asyncio.run(scan_tcp(host, port, unit_ids, timeout=timeout or 0.5, rtu_over_tcp=rtu_over_tcp,
                                                identify_devices=identify, guess=guess, progress=progress))]
            else:
                assert serial_port is not None
                results = asyncio.run(scan_serial(
                    serial_port, unit_ids, baudrates=baud or COMMON_BAUDRATES, parities=parities,
                    stopbits=stopbits, timeout=timeout or 0.2, quick_units=quick, all_settings=all_settings,
                    thorough=thorough, identify_devices=identify, guess=guess, progress=progress))  # type: ignore[arg-type]
    except LineDown as err:
        fail(f"{err}: check the host and port, or the serial port name and that no other program holds it "
             "(sudo systemctl stop kwwk-gateway)", 1)
    if not results:
        tried = f"{', '.join(map(str, baud or COMMON_BAUDRATES))} baud, parity {'/'.join(parities)}"
        out.print(f"[bold red]no device answered[/] on {serial_port} at {tried} (unit ids {quick_units} were tried). "
                  "Check A/B wiring, termination and the adapter; or scan every setting with --thorough.")
        raise typer.Exit(1)
    _print_scan(out, results)
    text = scan_yaml(results)
    out.print("\n[bold]Cell config snippet[/] (paste under the gateway):\n")
    out.print(text, markup=False, highlight=False)
    if yaml_out is not None:
        yaml_out.write_text(text)
        out.print(f"written to {yaml_out}")
    if not any(r.found for r in results):
        raise typer.Exit(1)


def _print_scan(out: Any, results: list[Any]) -> None:
    from rich.table import Table

    for res in results:
        table = Table(title=f"{res.where}: {len(res.found)} device(s) in {res.duration:.1f} s", title_justify="left")
        for col in ("unit", "profile", "named by", "device", "details"):
            table.add_column(col, overflow="fold")
        for f in res.found:
            profile = f.profile or (f"{f.candidates[0]}?" if f.candidates else "unknown")
            extra = list(f.details)
            if not f.profile and f.candidates:
                extra.append("plausible: " + ", ".join(f.candidates))
            table.add_row(str(f.unit_id), profile, f.how or "-", f.label or "-", "\n".join(extra) or f.answer)
        out.print(table)
        if res.ignores_unit_id:
            out.print("[yellow]every unit id answered: the device ignores the unit id; listed once, as unit 1[/]")
        if res.refusing:
            out.print(f"[dim]{len(res.refusing)} unit id(s) answered only 'device failure' (exception 4), as some "
                      "servers do for absent units; not listed[/]")


# ---------------------------------------------------------------------------------------------- probe

@app.command("probe", epilog="Example: kwwk commission probe --host 192.168.1.50 --unit 1 "
                             "--profile carlo_gavazzi_em24_e1   (or: --cell /etc/kwwk/cell.yaml --device grid)")
def probe(
    profile: Annotated[str | None, typer.Option(help="profile id from edge/profiles/")] = None,
    host: Annotated[str | None, typer.Option(help="Modbus TCP host")] = None,
    port: Annotated[int, typer.Option(help="TCP port")] = 502,
    rtu_over_tcp: Annotated[bool, typer.Option(help="the host passes RTU frames through")] = False,
    serial_port: Annotated[str | None, typer.Option(help="RS-485 adapter, e.g. /dev/ttyUSB0")] = None,
    baud: Annotated[int, typer.Option(help="baud rate (serial)")] = 9600,
    parity: Annotated[str, typer.Option(help="N, E or O (serial)")] = "N",
    stopbits: Annotated[int, typer.Option(help="1 or 2 (serial)")] = 1,
    unit: Annotated[int, typer.Option(help="unit id")] = 1,
    cell: Annotated[Path | None, typer.Option(help="take the device from this cell config instead",
                                              exists=True, dir_okay=False)] = None,
    device: Annotated[str | None, typer.Option(help="device id in --cell")] = None,
    points: Annotated[str | None, typer.Option(help="only these points, comma-separated")] = None,
    pause: Annotated[float, typer.Option(help="seconds between the two reads (frozen counters); 0: read once")] = 5.0,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each answer")] = 1.0,
) -> None:
    """Read every point of a device through its profile and judge it.

    Flags values outside their plausible range, counters that do not move (read twice with a pause)
    or go backwards, a device that does not identify as the profile says, and the usual mistakes:
    the wrong word order or an address off by one (it decodes the other way and says which makes the
    values plausible). Exit code 1 when anything fails.
    """
    from rich.console import Console

    from edge.cell import load_cell
    from edge.modbus import LineSpec, ModbusLine
    from edge.profile import get_profile
    from gateway.commission.probe import probe_device

    _quiet_libraries()
    out = Console(soft_wrap=True)
    if cell is not None:
        if not device:
            fail("--cell needs --device")
        with cli_errors(LookupError):
            cfg = load_cell(cell)
            dev = cfg.device(device)
        gw = next(g for g, d in cfg.devices() if d.id == dev.id)
        spec, unit = cfg.line_spec(gw, dev)
        prof = cfg.profiles[dev.id]
        label = dev.name or dev.id
    else:
        if profile is None or (host is None) == (serial_port is None):
            fail("give --profile and either --host or --serial-port (or --cell and --device)")
        with cli_errors(LookupError):
            prof = get_profile(profile)
        if host is not None:
            spec = LineSpec(kind="rtu_over_tcp" if rtu_over_tcp else "tcp", host=host, port=port, timeout=timeout)
        else:
            if parity.upper() not in ("N", "E", "O"):
                fail("parity must be N, E or O")
            spec = LineSpec(kind="rtu", serial_port=serial_port, baudrate=baud, parity=parity.upper(),
                            stopbits=stopbits, timeout=timeout)
        label = f"unit {unit}"
    selected = None
    if points:
        names = [n.strip() for n in points.split(",") if n.strip()]
        unknown = [n for n in names if n not in prof.by_name]
        if unknown:
            fail(f"profile {prof.id} has no point(s) {', '.join(unknown)}")
        selected = [prof.by_name[n] for n in names]

    async def run() -> Any:
        line = ModbusLine(spec)
        try:
            return await probe_device(line, prof, unit, points=selected, pause=pause, name=label)
        finally:
            await line.close()

    with out.status(f"reading {prof.id} at unit {unit} on {spec.key}" + (f", twice {pause:g} s apart" if pause else "")):
        result = asyncio.run(run())
    _print_probe(out, result)
    if result.status == "fail":
        raise typer.Exit(1)


def _print_probe(out: Any, probe: Any) -> None:
    from rich.table import Table

    p = probe.profile
    table = Table(title=f"{p.manufacturer} {p.model} ({p.id}), unit {probe.unit_id} on {probe.where}",
                  title_justify="left")
    for col in ("point", "value", "after pause", "unit", "range", "verdict", "note"):
        table.add_column(col, overflow="fold", justify="right" if col in ("value", "after pause") else "left")
    from gateway.commission.report import _point_note, _range, _value

    for c in probe.points:
        second = _value(c.second) if c.point.kind == "counter" and probe.pause > 0 else ""
        table.add_row(c.point.name, _value(c.value), second, c.unit, _range(c),
                      f"[{_STYLE[c.status]}]{c.verdict}[/]", _point_note(c))
    out.print(table)
    if probe.identity:
        out.print("identification: " + "; ".join(probe.identity), markup=False)
    for f in probe.findings:
        out.print(f"[{_STYLE[f.status]}]{f.status.upper()}[/] ", end="")
        out.print(f.message, markup=False)
        if f.fix:
            out.print(f"     fix: {f.fix}", markup=False, style="dim")
    out.print(f"[{_STYLE[probe.status]}]{probe.status.upper()}[/]: {probe.summary}", highlight=False)


# ---------------------------------------------------------------------------------------------- verify

@app.command("verify", epilog="Example: kwwk commission verify --cell /etc/kwwk/cell.yaml --gateway gw-musterdorf-1 "
                              "--technician 'A. Weber'   (reads /etc/kwwk/gateway.env when present)")
def verify(
    cell: Annotated[Path, typer.Option(help="cell config file", exists=True, dir_okay=False)],
    gateway: gs.GatewayOpt = None,
    env_file: gs.EnvFileOpt = None,
    mqtt_host: gs.MqttHostOpt = None,
    mqtt_port: gs.MqttPortOpt = None,
    mqtt_username: gs.MqttUserOpt = None,
    mqtt_password_file: gs.MqttPassOpt = None,
    mqtt_tls: gs.MqttTlsOpt = None,
    mqtt_ca: gs.MqttCaOpt = None,
    allow_plain: Annotated[bool, typer.Option(help="accept plain MQTT (a lab broker without TLS)")] = False,
    outbox: gs.OutboxOpt = None,
    pause: Annotated[float, typer.Option(help="seconds between the two reads of each device (frozen counters)")]
    = 5.0,
    clock_max_offset: Annotated[float, typer.Option(help="allowed clock offset against the central clock, "
                                                         "seconds")] = 10.0,
    beacon_wait: Annotated[float, typer.Option(help="seconds to wait for the central time beacon")] = 3.0,
    min_free_mb: Annotated[float | None, typer.Option(help="free disk the outbox needs (default: room to reach "
                                                           "its max_mb, plus 64 MB)")] = None,
    report_dir: Annotated[Path, typer.Option(help="where the HTML and Markdown reports go")]
    = Path("var/commission"),
    technician: Annotated[str | None, typer.Option(help="who commissions (goes into the report)")] = None,
    service_user: Annotated[str, typer.Option(help="user the gateway service runs as (outbox ownership)")] = "kwwk",
    print_settings: gs.PrintSettingsOpt = False,
) -> None:
    """Check a gateway end to end and write the commissioning report.

    Devices reachable, identified and plausible; the MQTT password file in place; the broker reached
    over TLS with the gateway's credentials and its ACL letting it publish its status (and nothing
    else); the clock within --clock-max-offset of the central server (time beacon, or NTP state);
    the outbox writable with enough disk. Each check passes or fails with the fix to try. Broker,
    account and outbox are resolved exactly as `kwwk gateway run` resolves them: options, then the
    environment (KWWK_*), then the gateway's environment file, then the cell config.
    Exit code 0 when nothing failed, 1 otherwise.
    """
    from rich.console import Console
    from rich.table import Table

    from edge.cell import load_cell
    from gateway.commission.report import write_reports
    from gateway.commission.verify import verify as run_verify

    _quiet_libraries()
    out = Console(soft_wrap=True)
    flags = gs.GatewayFlags(gateway=gateway, env_file=env_file, mqtt_host=mqtt_host, mqtt_port=mqtt_port,
                         mqtt_username=mqtt_username, mqtt_password_file=mqtt_password_file, mqtt_tls=mqtt_tls,
                         mqtt_ca=mqtt_ca, outbox=outbox)
    with cli_errors():
        cfg = load_cell(cell)
        settings = gs.resolve(cfg, flags)
    if print_settings:
        typer.echo(settings.to_json())
        return
    gw = cfg.gateway(settings.gateway)
    target = settings.mqtt
    with out.status(f"verifying {gw.id}: {len(gw.devices)} device(s), broker {target.address}, clock, outbox"):
        report = asyncio.run(run_verify(
            cfg, gw.id, broker=target, outbox=settings.outbox, password_file=settings.password_file, pause=pause,
            clock_max_offset=clock_max_offset, min_free_mb=min_free_mb, require_tls=not allow_plain,
            beacon_wait=beacon_wait, technician=technician, service_user=service_user))
    table = Table(title=f"{cfg.cell.name} / {gw.id}", title_justify="left")
    for col in ("result", "check", "finding", "fix to try"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(f"[{_STYLE[c.status]}]{c.status.upper()}[/]", c.name, c.summary, c.fix)
    out.print(table)
    md, page = write_reports(report, report_dir)
    counts = report.counts()
    out.print(f"[{_STYLE[report.status]}]{'PASS' if report.passed else 'FAIL'}[/]: {counts['pass']} passed, "
              f"{counts['warn']} warnings, {counts['fail']} failed, {counts['skip']} not checked")
    out.print(f"report: {page}\n        {md}", highlight=False)
    if not report.passed:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - `python -m gateway.commission.cli`
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
