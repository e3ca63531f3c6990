#!/usr/bin/env python3
"""Prepare a freshly flashed Raspberry Pi OS SD card for one KWWK gateway (standard library only).

Writes onto the card's boot partition (the FAT partition your laptop mounts, e.g. /media/$USER/bootfs):

    user-data, meta-data, network-config     cloud-init's first-boot instructions (from the templates here)
    kwwk/kwwk-src.tar.gz                     the gateway's code (git archive of this checkout, or --src-tarball)
    kwwk/cell.yaml                           the cell config
    kwwk/ca.crt                              the broker's CA certificate
    kwwk/mqtt-password                       only with --password-file; moved to /etc/kwwk and deleted on first boot

Example:

    python3 firmware_configs/pi/cloud-init/prepare_sd.py --boot /media/$USER/bootfs \\
        --gateway gw-musterdorf-1 --cell firmware_configs/cells/musterdorf.yaml \\
        --mqtt-host broker.example.org --ca ca.crt --ssh-key ~/.ssh/id_ed25519.pub \\
        --password-hash "$(openssl passwd -6)" --password-file var/secrets/gw-musterdorf-1.password

Every value is checked before anything is written: a typo fails here, not on site.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
TOKEN = re.compile(r"\$\{(KWWK_[A-Z0-9_]+)\}")

CHECKS: dict[str, tuple[str, str]] = {
    "KWWK_GATEWAY": (r"[a-z0-9][a-z0-9-]{0,47}", "lower-case letters, digits and '-' (it is also the host name)"),
    "KWWK_MQTT_HOST": (r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", "a host name or IPv4 address"),
    "KWWK_MQTT_PORT": (r"[0-9]{1,5}", "a TCP port"),
    "KWWK_MQTT_USERNAME": (r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "the gateway's MQTT user name"),
    "KWWK_ADMIN_SSH_KEY": (r"(ssh-(ed25519|rsa)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( [^\"\n]*)?",
                           "one OpenSSH public key line"),
    "KWWK_ADMIN_PASSWORD_HASH": (r"\$(6|y|5)\$[./A-Za-z0-9$=]+", "a crypt hash: openssl passwd -6"),
    "KWWK_NTP_SERVERS": (r"[A-Za-z0-9. -]*", "NTP servers separated by spaces (or empty)"),
    "KWWK_ETH0": (r"[\s\S]*", ""),  # built here, not typed in
}


class Problem(Exception):
    pass


def render(template: str, values: dict[str, str]) -> str:
    """Fill every ${KWWK_...} token; an unknown or unset token is an error."""
    missing = sorted({m.group(1) for m in TOKEN.finditer(template)} - set(values))
    if missing:
        raise Problem(f"no value for {', '.join(missing)}")
    return TOKEN.sub(lambda m: values[m.group(1)], template)


def check(values: dict[str, str]) -> None:
    for key, value in values.items():
        pattern, what = CHECKS[key]
        if not re.fullmatch(pattern, value):
            raise Problem(f"{key.removeprefix('KWWK_').lower()}: {value!r} is not {what}")
    if not 1 <= int(values["KWWK_MQTT_PORT"]) <= 65535:
        raise Problem(f"mqtt port {values['KWWK_MQTT_PORT']} is outside 1..65535")


def eth0(address: str | None, gateway_ip: str | None, dns: list[str]) -> str:
    """The eth0 block of network-config, indented for the template."""
    pad = "\n      "
    if address is None:
        return pad.join(["dhcp4: true", "optional: true"])
    try:
        iface = ipaddress.ip_interface(address)
        gw = ipaddress.ip_address(gateway_ip) if gateway_ip else None
        servers = [str(ipaddress.ip_address(d)) for d in dns]
    except ValueError as err:
        raise Problem(f"network: {err}") from None
    if gw is not None and gw not in iface.network:
        raise Problem(f"network: the router {gw} is not in {iface.network}")
    lines = ["dhcp4: false", f"addresses: [{iface.with_prefixlen}]"]
    if gw is not None:
        lines.append(f"routes: [{{to: default, via: {gw}}}]")
    if servers:
        lines.append(f"nameservers: {{addresses: [{', '.join(servers)}]}}")
    return pad.join(lines)


def check_cell(cell: Path, gateway: str) -> None:
    """Validate the cell config with the project's own loader when it is importable (a checkout with its venv)."""
    sys.path.insert(0, str(REPO))
    try:
        from edge.cell import load_cell  # noqa: PLC0415 - optional
        from edge.yamlio import ConfigError  # noqa: PLC0415
    except ImportError:
        text = cell.read_text()
        if f"id: {gateway}" not in text:
            raise Problem(f"{cell} has no gateway {gateway!r}") from None
        return
    try:
        load_cell(cell).gateway(gateway)
    except (ConfigError, LookupError) as err:
        raise Problem(str(err)) from None


def source_tarball(dest: Path, given: Path | None) -> None:
    if given is not None:
        shutil.copyfile(given, dest)
        return
    try:
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", str(dest), "HEAD"], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise Problem(f"cannot make the source archive with git ({err}); give --src-tarball") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boot", type=Path, required=True, help="the SD card's boot partition (mounted)")
    ap.add_argument("--gateway", required=True, help="gateway id from the cell config (also the host name)")
    ap.add_argument("--cell", type=Path, required=True, help="the cell config file")
    ap.add_argument("--ca", type=Path, required=True, help="the broker's CA certificate (PEM)")
    ap.add_argument("--mqtt-host", required=True)
    ap.add_argument("--mqtt-port", default="8883")
    ap.add_argument("--mqtt-username", help="default: the gateway id")
    ap.add_argument("--ssh-key", type=Path, required=True, help="technicians' SSH public key file")
    ap.add_argument("--password-hash", required=True, help="console password of kwwk-admin: openssl passwd -6")
    ap.add_argument("--password-file", type=Path, help="the gateway's MQTT password (from kwwk broker acl)")
    ap.add_argument("--ntp", default="", help="NTP servers on site, space-separated (e.g. the router)")
    ap.add_argument("--address", help="fixed IPv4 address with prefix, e.g. 192.168.1.20/24 (default DHCP)")
    ap.add_argument("--gateway-ip", help="default route for --address")
    ap.add_argument("--dns", action="append", default=[], help="name server for --address (repeat)")
    ap.add_argument("--src-tarball", type=Path, help="the code as .tar.gz (default: git archive HEAD of this checkout)")
    args = ap.parse_args(argv)
    try:
        if not args.boot.is_dir():
            raise Problem(f"{args.boot} is not a mounted boot partition")
        for path in (args.cell, args.ca, args.ssh_key, args.password_file, args.src_tarball):
            if path is not None and not path.is_file():
                raise Problem(f"{path} does not exist")
        if "BEGIN CERTIFICATE" not in args.ca.read_text(errors="replace"):
            raise Problem(f"{args.ca} is not a PEM certificate")
        if args.password_file is not None and not args.password_file.read_text().strip():
            raise Problem(f"{args.password_file} is empty")
        key_lines = [ln.strip() for ln in args.ssh_key.read_text().splitlines() if ln.strip()]
        if len(key_lines) != 1:
            raise Problem(f"{args.ssh_key} must hold exactly one public key line")
        values = {
            "KWWK_GATEWAY": args.gateway, "KWWK_MQTT_HOST": args.mqtt_host, "KWWK_MQTT_PORT": args.mqtt_port,
            "KWWK_MQTT_USERNAME": args.mqtt_username or args.gateway, "KWWK_ADMIN_SSH_KEY": key_lines[0],
            "KWWK_ADMIN_PASSWORD_HASH": args.password_hash, "KWWK_NTP_SERVERS": args.ntp.strip(),
            "KWWK_ETH0": eth0(args.address, args.gateway_ip, args.dns),
        }
        check(values)
        check_cell(args.cell, args.gateway)
        rendered = {name: render((HERE / f"{name}.template").read_text(), values)
                    for name in ("user-data", "meta-data", "network-config")}
    except Problem as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, text in rendered.items():
        (args.boot / name).write_text(text)
    seed = args.boot / "kwwk"
    seed.mkdir(exist_ok=True)
    try:
        source_tarball(seed / "kwwk-src.tar.gz", args.src_tarball)
    except Problem as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shutil.copyfile(args.cell, seed / "cell.yaml")
    shutil.copyfile(args.ca, seed / "ca.crt")
    if args.password_file is not None:
        shutil.copyfile(args.password_file, seed / "mqtt-password")
    print(f"SD card ready for {args.gateway}: {', '.join(sorted(rendered))} and kwwk/ on {args.boot}")
    print("Eject it, put it in the Pi, connect Ethernet and power; first boot takes about 10 minutes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
