"""The commissioning report: one Markdown and one HTML file per verify run, for the cooperative's files.

Both name the site (cell, gateway, location), who checked and when, every check with its result and
the fix to try, and every device with its connection and the readings taken (value, unit, plausible
range, verdict). The HTML file is self-contained (inline CSS, no scripts) so it can be mailed or printed.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from gateway.commission.common import fmt_number
from gateway.commission.probe import DeviceProbe, PointCheck
from gateway.commission.verify import VerifyReport

__all__ = ["render_html", "render_markdown", "write_reports"]

_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


def _value(v: float | str | None) -> str:
    if v is None:
        return "—"
    return v if isinstance(v, str) else fmt_number(v)


def _range(c: PointCheck) -> str:
    r = c.point.range
    return f"{_value(r[0])} … {_value(r[1])}" if r else ""


def _point_note(c: PointCheck) -> str:
    return "; ".join(x for x in [c.note, *c.hints] if x)


def _reads(probe: DeviceProbe) -> str:
    return f"counters read twice, {probe.pause:g} s apart" if probe.pause > 0 else "read once"


def _site(r: VerifyReport) -> list[tuple[str, str]]:
    cell, gw = r.cfg.cell, r.gateway
    rows = [("Cell", f"{cell.name} ({cell.id})"), ("Gateway", f"{gw.name or gw.id} ({gw.id})")]
    if cell.location is not None:
        rows.append(("Location", f"{cell.location.latitude:.5f}, {cell.location.longitude:.5f}"))
    rows += [("Time zone", cell.timezone), ("Checked on", r.started.strftime("%Y-%m-%d %H:%M:%S UTC")),
             ("Checked by", r.technician or "—"), ("Machine", r.host), ("Cell config", r.cfg.source or "—")]
    if r.broker is not None:
        rows.append(("Broker", f"{r.broker.host}:{r.broker.port} ({'TLS' if r.broker.tls else 'plain'}) as "
                               f"{r.broker.username or '—'}"))
    if r.outbox is not None:
        rows.append(("Outbox", str(r.outbox)))
    return rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(r: VerifyReport) -> str:
    counts = r.counts()
    out = [f"# Commissioning report: {r.cfg.cell.name} / {r.gateway.id}", "",
           f"**Result: {_MARK[r.status]}** — {counts['pass']} passed, {counts['warn']} warnings, "
           f"{counts['fail']} failed, {counts['skip']} not checked", "", "## Site", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_md_cell(v)} |" for k, v in _site(r)]
    out += ["", "## Checks", "", "| result | check | finding | fix to try |", "|---|---|---|---|"]
    out += [f"| {_MARK[c.status]} | {c.name} | {_md_cell(c.summary)} | {_md_cell(c.fix)} |" for c in r.checks]
    detailed = [c for c in r.checks if c.details]
    if detailed:
        out += ["", "### Details", ""]
        for c in detailed:
            out.append(f"- **{c.name}**: " + "; ".join(_md_cell(d) for d in c.details))
    out += ["", "## Devices", ""]
    for dev, spec, probe in r.devices:
        out += _md_device(dev.id, dev.name, spec.key, probe)
    out += ["", f"_Written by kwwk commission verify on {r.host}, "
                f"{(r.finished or r.started).strftime('%Y-%m-%d %H:%M:%S UTC')}._", ""]
    return "\n".join(out)


def _md_device(dev_id: str, name: str | None, where: str, probe: DeviceProbe) -> list[str]:
    p = probe.profile
    out = [f"### {dev_id}" + (f" — {name}" if name and name != dev_id else ""), "",
           f"{_MARK[probe.status]}: {p.manufacturer} {p.model} (profile `{p.id}`), unit {probe.unit_id} on "
           f"`{where}`; {probe.requests} requests; {_reads(probe)}.", ""]
    if probe.identity:
        out += ["Identification: " + "; ".join(probe.identity), ""]
    out += ["| point | value | after pause | unit | plausible range | verdict | note |",
            "|---|---|---|---|---|---|---|"]
    for c in probe.points:
        second = _value(c.second) if c.point.kind == "counter" and probe.pause > 0 else ""
        out.append(f"| {c.point.name} | {_md_cell(_value(c.value))} | {second} | {c.unit} | {_range(c)} | "
                   f"{_MARK[c.status]} {c.verdict} | {_md_cell(_point_note(c))} |")
    out.append("")
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1b1f23;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}h3{font-size:1.05rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}th,td{border:1px solid #d0d7de;padding:.3rem .5rem;
text-align:left;vertical-align:top;font-size:.9rem}th{background:#f6f8fa}
.pass{color:#1a7f37;font-weight:600}.warn{color:#9a6700;font-weight:600}.fail{color:#cf222e;font-weight:600}
.skip{color:#57606a}.result{font-size:1.2rem;padding:.5rem 1rem;display:inline-block;border:2px solid}
.num{text-align:right;font-variant-numeric:tabular-nums}small{color:#57606a}
@media print{body{margin:0}}
"""


def _h(text: object) -> str:
    return html.escape(str(text))


def render_html(r: VerifyReport) -> str:
    counts = r.counts()
    title = f"Commissioning report: {r.cfg.cell.name} / {r.gateway.id}"
    parts = [
        "<!doctype html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{_h(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{_h(title)}</h1>",
        f"<p class=\"result {r.status}\">Result: {_MARK[r.status]}</p>",
        f"<p>{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed, {counts['skip']} not checked</p>",
        "<h2>Site</h2><table>",
    ]
    parts += [f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in _site(r)]
    parts += ["</table>", "<h2>Checks</h2>",
              "<table><tr><th>result</th><th>check</th><th>finding</th><th>fix to try</th></tr>"]
    for c in r.checks:
        details = "".join(f"<br><small>{_h(d)}</small>" for d in c.details)
        parts.append(f"<tr><td class=\"{c.status}\">{_MARK[c.status]}</td><td>{_h(c.name)}</td>"
                     f"<td>{_h(c.summary)}{details}</td><td>{_h(c.fix)}</td></tr>")
    parts += ["</table>", "<h2>Devices</h2>"]
    for dev, spec, probe in r.devices:
        p = probe.profile
        head = dev.id + (f" — {dev.name}" if dev.name and dev.name != dev.id else "")
        parts += [f"<h3>{_h(head)}</h3>",
                  f"<p><span class=\"{probe.status}\">{_MARK[probe.status]}</span> {_h(p.manufacturer)} "
                  f"{_h(p.model)} (profile <code>{_h(p.id)}</code>), unit {probe.unit_id} on <code>{_h(spec.key)}</code>; "
                  f"{probe.requests} requests; {_h(_reads(probe))}.</p>"]
        if probe.identity:
            parts.append(f"<p><small>Identification: {_h('; '.join(probe.identity))}</small></p>")
        parts.append("<table><tr><th>point</th><th>value</th><th>after pause</th><th>unit</th>"
                     "<th>plausible range</th><th>verdict</th><th>note</th></tr>")
        for c in probe.points:
            second = _value(c.second) if c.point.kind == "counter" and probe.pause > 0 else ""
            parts.append(f"<tr><td>{_h(c.point.name)}</td><td class=\"num\">{_h(_value(c.value))}</td>"
                         f"<td class=\"num\">{_h(second)}</td><td>{_h(c.unit)}</td><td>{_h(_range(c))}</td>"
                         f"<td class=\"{c.status}\">{_MARK[c.status]} {_h(c.verdict)}</td>"
                         f"<td>{_h(_point_note(c))}</td></tr>")
        parts.append("</table>")
    parts += [f"<p><small>Written by kwwk commission verify on {_h(r.host)}, "
              f"{_h((r.finished or r.started).strftime('%Y-%m-%d %H:%M:%S UTC'))}.</small></p>", "</body></html>", ""]
    return "\n".join(parts)


def write_reports(r: VerifyReport, folder: Path) -> tuple[Path, Path]:
    """Write <cell>_<gateway>_<UTC time>.md and .html into folder; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{r.cfg.cell.id}_{r.gateway.id}_{r.started.strftime('%Y%m%dT%H%M%SZ')}")
    md, page = folder / f"{stem}.md", folder / f"{stem}.html"
    md.write_text(render_markdown(r), encoding="utf-8")
    page.write_text(render_html(r), encoding="utf-8")
    return md, page
