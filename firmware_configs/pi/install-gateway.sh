#!/bin/sh
# Install the KWWK gateway on Raspberry Pi OS (Debian). Run as root from a checkout of the project:
#   sudo sh firmware_configs/pi/install-gateway.sh
# Idempotent: running it again upgrades the code and keeps /etc/kwwk and /var/lib/kwwk.
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-pip

id kwwk >/dev/null 2>&1 || useradd --system --home-dir /var/lib/kwwk --shell /usr/sbin/nologin --groups dialout kwwk
install -d -m 0755 /opt/kwwk
install -d -m 0750 -o root -g kwwk /etc/kwwk
install -d -m 0750 -o kwwk -g kwwk /var/lib/kwwk

rm -rf /opt/kwwk/src && cp -r "$src" /opt/kwwk/src && rm -rf /opt/kwwk/src/.venv /opt/kwwk/src/var
[ -x /opt/kwwk/venv/bin/python ] || python3 -m venv /opt/kwwk/venv
/opt/kwwk/venv/bin/pip install -q --upgrade pip
# the gateway extra only: edge, gateway and the kwwk command; no simulator, demo, central code or dependencies
/opt/kwwk/venv/bin/pip install -q "/opt/kwwk/src[gateway]"

ln -sf /opt/kwwk/venv/bin/kwwk /usr/local/bin/kwwk   # technicians type `kwwk commission ...`
[ -f /etc/kwwk/gateway.env ] || install -m 0640 -o root -g kwwk "$src/firmware_configs/pi/gateway.env.example" /etc/kwwk/gateway.env
chown root:kwwk /etc/kwwk/gateway.env && chmod 0640 /etc/kwwk/gateway.env
install -m 0644 "$src/firmware_configs/systemd/kwwk-gateway.service" /etc/systemd/system/kwwk-gateway.service
install -d /etc/systemd/journald.conf.d
install -m 0644 "$src/firmware_configs/systemd/journald-kwwk.conf" /etc/systemd/journald.conf.d/kwwk.conf
systemctl daemon-reload
systemctl restart systemd-journald || true

echo "installed. Next: put the cell config in /etc/kwwk/cell.yaml, the broker CA in /etc/kwwk/ca.crt,"
echo "the MQTT password in /etc/kwwk/mqtt-password (mode 0640 root:kwwk), edit /etc/kwwk/gateway.env, then:"
echo "  systemctl enable --now kwwk-gateway && journalctl -fu kwwk-gateway"
