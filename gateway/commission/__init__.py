"""Commissioning on site: from the box to trusted data.

- scan.py: find the devices on a serial bus or a TCP host and name their profiles;
- probe.py: read one device through its profile and judge every value;
- checks.py, verify.py: the gateway end to end (devices, broker TLS and ACL, clock, outbox);
- report.py: the commissioning report (HTML and Markdown);
- cli.py: `kwwk commission scan | probe | verify`.

Every Modbus read goes through the line's arbiter (edge.modbus.ModbusLine), ignoring the per-device
backoff: a commissioning read is deliberate, and still never collides with another on the wire.
"""
