"""The residents' page in real Chromium (Debian's /usr/bin/chromium, driven by Playwright), served by the API
under uvicorn on a loopback port with simulator data behind it.

Every number the page shows carries its exact value (`<data value>` in the text, `data-value` in the
diagram); each must equal the public API's, and its text must be that value as the page's language
writes it. The page loads for every demo cell, switches language, fits a 360 px phone, passes contrast,
label and keyboard checks, and loads nothing from anywhere else. Screenshots go to test-artefacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import ROOT
from tests.test_api_data import ApiData, api_data, live_api  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.integration

ARTEFACTS = ROOT / "test-artefacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 360, "height": 740}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
UNITS = ("kWh/m³", "kWh", "m³", "%")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser: Browser, url: str, viewport: dict[str, int], cell: str, lang: str = "de") -> Page:
    page = browser.new_page(viewport=viewport, locale="de-DE" if lang == "de" else "en-GB")
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(f"{url}/?cell={cell}&lang={lang}")
    page.wait_for_selector(f"body[data-loaded='{cell}']")
    return page


def _parse(text: str, lang: str) -> tuple[float, int]:
    """The number a label shows, and how many decimals it shows."""
    s = text.replace("\u00a0", " ").strip()
    for unit in UNITS:
        if s.endswith(unit):
            s = s[: -len(unit)].strip()
            break
    thousands, decimal = (".", ",") if lang == "de" else (",", ".")
    pattern = rf"-?\d{{1,3}}({re.escape(thousands)}\d{{3}})*({re.escape(decimal)}\d+)?"
    assert re.fullmatch(pattern, s), f"{text!r} ({lang})"
    s = s.replace(thousands, "").replace(decimal, ".")
    return float(s), len(s.split(".")[1]) if "." in s else 0


def _api_value(summary: dict, key: str) -> float:
    parts = key.split(".")
    if parts[0] == "flows":  # flows.<window>.<loop>.<sources|uses>.<key>
        _, window, loop, side, item = parts
        (found,) = [f["value"] for f in summary[window]["flows"][loop][side] if f["key"] == item]
        return found
    window, loop, figure = parts
    if loop == "coverage_pct":  # the page shows the lowest of the loops'
        return min(summary[window]["coverage_pct"].values())
    return summary[window][loop][figure]


def _shown(page: Page) -> list[dict[str, str]]:
    return page.eval_on_selector_all("[data-key]", """els => els.map(e => ({
        key: e.dataset.key, value: e.getAttribute('value') ?? e.dataset.value, text: e.textContent}))""")


def _check_numbers(page: Page, summary: dict, lang: str) -> set[str]:
    shown = _shown(page)
    assert shown
    for item in shown:
        want = _api_value(summary, item["key"])
        assert float(item["value"]) == want, item
        number, decimals = _parse(item["text"], lang)
        assert abs(number - want) <= 0.5 * 10 ** -decimals + 1e-9, item
    return {i["key"] for i in shown}


@pytest.mark.parametrize("cell", ["musterdorf", "lindenau"])
def test_each_demo_cell_shows_the_public_apis_numbers(browser: Browser, live_api: str, cell: str) -> None:  # noqa: F811
    summary = httpx.get(f"{live_api}/api/public/cells/{cell}/summary").json()
    ARTEFACTS.mkdir(exist_ok=True)
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = _open(browser, live_api, viewport, cell)
        assert page.locator("h1").inner_text() == f"Energie und Wasser in {summary['name']}"
        keys = _check_numbers(page, summary, "de")
        # the key figures, every figure of the table that the API has, and every band of today's diagrams
        assert {"today.electricity.self_sufficiency_pct", "last_30_days.electricity.self_sufficiency_pct",
                "today.heat.local_share_pct", "today.water.abstraction"} <= keys
        table = {f"{w}.{k}" for w in ("today", "last_30_days", "this_year")
                 for k in ("electricity.generation", "electricity.grid_import", "heat.generation", "water.supply")}
        assert table <= keys
        for loop, flows in summary["today"]["flows"].items():
            for side in ("sources", "uses"):
                assert {f"flows.today.{loop}.{side}.{f['key']}" for f in flows[side]} <= keys
        assert page.locator("svg.flow").count() == 3
        page.screenshot(path=str(ARTEFACTS / f"page-{cell}-{name}.png"), full_page=True)
        # the diagrams of the other windows, one click away, show their own numbers
        page.get_by_role("button", name="Letzte 30 Tage").click()
        assert "flows.last_30_days.electricity.sources.solar" in _check_numbers(page, summary, "de")
        page.get_by_role("button", name="Dieses Jahr").click()
        assert "flows.this_year.water.sources.wells" in _check_numbers(page, summary, "de")
        assert page.errors == []  # type: ignore[attr-defined]
        page.close()


def test_every_public_cell_loads_and_a_protected_figure_says_so(browser: Browser, live_api: str) -> None:  # noqa: F811
    cells = [c["id"] for c in httpx.get(f"{live_api}/api/public/cells").json()]
    assert cells == ["einzelhof", "lindenau", "musterdorf"]
    page = _open(browser, live_api, DESKTOP, "musterdorf")
    assert [o for o in page.locator("#cell option").evaluate_all("os => os.map(o => o.value)")] == cells
    page.select_option("#cell", "einzelhof")
    page.wait_for_selector("body[data-loaded='einzelhof']")
    summary = httpx.get(f"{live_api}/api/public/cells/einzelhof/summary").json()
    _check_numbers(page, summary, "de")
    row = page.locator("tr", has_text="Wärme an die Gebäude geliefert")
    assert row.locator("td").all_inner_texts() == ["geschützt"] * 3
    assert "damit kein Haushalt erkennbar ist" in page.locator("#flows").inner_text()
    assert "einzelhof" in page.url
    page.close()


def test_switching_language(browser: Browser, live_api: str) -> None:  # noqa: F811
    summary = httpx.get(f"{live_api}/api/public/cells/musterdorf/summary").json()
    page = _open(browser, live_api, DESKTOP, "musterdorf", "de")
    assert page.evaluate("document.documentElement.lang") == "de"
    pumping = page.locator("[data-key='today.water.pumping_kwh_per_m3']").first
    assert pumping.inner_text() == f"{summary['today']['water']['pumping_kwh_per_m3']:.2f}".replace(".", ",") + "\u00a0kWh/m³"
    page.get_by_role("button", name="English").click()
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.locator("h1").inner_text() == "Energy and water in Musterdorf"
    assert page.get_by_role("button", name="English").get_attribute("aria-pressed") == "true"
    assert page.locator("#h-flows").inner_text() == "Where it comes from, where it goes"
    assert "Of the electricity used in Musterdorf today" in page.locator("#cards").inner_text()
    assert pumping.inner_text() == f"{summary['today']['water']['pumping_kwh_per_m3']:.2f}\u00a0kWh/m³"
    _check_numbers(page, summary, "en")
    page.screenshot(path=str(ARTEFACTS / "page-musterdorf-desktop-en.png"), full_page=True)
    page.reload()  # the choice is kept
    page.wait_for_selector("body[data-loaded='musterdorf']")
    assert page.evaluate("document.documentElement.lang") == "en" and "lang=en" in page.url
    page.get_by_role("button", name="Deutsch").click()
    assert page.locator("h1").inner_text() == "Energie und Wasser in Musterdorf"
    page.close()
    phone = _open(browser, live_api, PHONE, "lindenau", "en")
    _check_numbers(phone, httpx.get(f"{live_api}/api/public/cells/lindenau/summary").json(), "en")
    phone.screenshot(path=str(ARTEFACTS / "page-lindenau-phone-en.png"), full_page=True)
    phone.close()


CONTRAST = """() => {
  const parse = (c) => { const m = /rgba?\\(([^)]+)\\)/.exec(c); if (!m) return null;
    const p = m[1].split(',').map(Number); return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lum = ({r, g, b}) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => { for (; el; el = el.parentElement) { const c = parse(getComputedStyle(el).backgroundColor);
    if (c && c.a > 0.99) return c; } return {r: 255, g: 255, b: 255, a: 1}; };
  const out = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walk.nextNode()) {
    const node = walk.currentNode, el = node.parentElement;
    if (!node.textContent.trim() || !el.getClientRects().length || el.closest('[hidden], noscript')) continue;
    const cs = getComputedStyle(el), svg = el instanceof SVGElement;
    const fg = parse(svg ? cs.fill : cs.color), bg = background(svg ? el.closest('svg') : el);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    const size = parseFloat(cs.fontSize), bold = parseInt(cs.fontWeight) >= 700;
    const need = size >= 24 || (size >= 18.66 && bold) ? 3 : 4.5;
    out.push({text: node.textContent.trim().slice(0, 40), ratio: (hi + 0.05) / (lo + 0.05), need});
  }
  return out;
}"""


def test_phone_width_accessibility_and_keyboard(browser: Browser, live_api: str) -> None:  # noqa: F811
    page = _open(browser, live_api, PHONE, "musterdorf")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "no sideways scrolling"
    for fig in page.locator("figure.flow-figure").all():
        box = fig.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    checked = page.evaluate(CONTRAST)
    assert len(checked) > 100
    low = [c for c in checked if c["ratio"] < c["need"]]
    assert not low, low[:5]
    # every control has a name, and is big enough to hit with a finger
    assert page.get_by_label("Ort", exact=True).evaluate("e => e.id") == "cell"
    for control in page.locator("select, button").all():
        assert control.evaluate("e => e.labels?.length || e.textContent.trim().length") > 0
        assert control.bounding_box()["height"] >= 44  # type: ignore[index]
    for svg in page.locator("svg.flow").all():
        assert svg.get_attribute("role") == "img"
        ids = svg.get_attribute("aria-labelledby").split()  # type: ignore[union-attr]
        assert all(page.locator(f"#{i}").text_content() for i in ids)
    assert page.locator("#numbers th[scope=row]").count() == 16
    # keyboard only: skip link, the place, the language
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "cell"
    page.keyboard.press("ArrowUp")  # musterdorf is last: one up is lindenau
    page.wait_for_selector("body[data-loaded='lindenau']")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.lang") == "en"
    page.keyboard.press("Enter")
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.errors == []  # type: ignore[attr-defined]
    page.close()


def test_nothing_is_loaded_from_anywhere_else(browser: Browser, live_api: str) -> None:  # noqa: F811
    page = browser.new_page(viewport=DESKTOP)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    response = page.goto(f"{live_api}/?cell=musterdorf")
    page.wait_for_selector("body[data-loaded='musterdorf']")
    page.get_by_role("button", name="English").click()
    page.select_option("#cell", "lindenau")
    page.wait_for_selector("body[data-loaded='lindenau']")
    assert requests and all(u.startswith(f"{live_api}/") for u in requests), requests
    assert {u.split("?")[0].removeprefix(live_api) for u in requests} >= {
        "/", "/static/app.css", "/static/app.js", "/static/i18n.js", "/static/flow.js", "/static/format.js",
        "/api/public/cells", "/api/public/cells/musterdorf/summary", "/api/public/cells/lindenau/summary"}
    csp = response.headers["content-security-policy"]  # type: ignore[union-attr]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    static = httpx.get(f"{live_api}/static/app.js")
    assert static.headers["content-security-policy"] == csp and static.headers["x-content-type-options"] == "nosniff"
    page.close()
