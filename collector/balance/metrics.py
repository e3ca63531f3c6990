"""The KWWK metrics of one loop in one interval, derived from that interval's summed quantities
(never averaged from shorter intervals). Definitions and worked examples: docs/balance.md.

`base` holds the loop's summable fields: one per role the cell meters (kWh, or m³ for water), plus
`pumping_energy` (water), `input_m3` (fuel), and for the `chp` pseudo-loop `electricity`, `heat` and
`fuel`. A metric is derived only when the roles it needs are metered in the cell (present in `base`);
a ratio whose denominator is zero or negative takes the documented fallback, so every interval of a
cell carries the same fields (a rewrite then overwrites every field it wrote before).
"""

from __future__ import annotations

__all__ = ["DERIVED", "EXTENSIVE_DERIVED", "derive"]

#: fields computed from the base quantities (everything else in a row is summed in roll-ups)
DERIVED = frozenset({
    "load", "residual", "self_sufficiency_pct", "self_consumption_pct",
    "network_loss", "network_loss_pct",
    "non_revenue", "pumping_kwh_per_m3", "recycled_share_pct",
    "power_to_heat", "eta_el_pct", "eta_th_pct", "eta_total_pct",
})
#: derived fields that are quantities (sum over cells, divide per resident); the rest are ratios
EXTENSIVE_DERIVED = frozenset({"load", "residual", "network_loss", "non_revenue"})


def _pct(num: float, den: float, fallback: float = 0.0) -> float:
    return 100.0 * num / den if den > 0 else fallback


def _electricity(b: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "generation" in b or "grid_import" in b:
        load = (b.get("grid_import", 0.0) + b.get("generation", 0.0) + b.get("storage_discharge", 0.0)
                - b.get("grid_export", 0.0) - b.get("storage_charge", 0.0))
        out["load"] = load
        out["residual"] = load - b.get("consumption", 0.0)
        if "grid_import" in b:
            out["self_sufficiency_pct"] = 100.0 * (1 - min(1.0, b["grid_import"] / load)) if load > 0 else 100.0
    if "generation" in b and "grid_export" in b:
        gen = b["generation"]
        out["self_consumption_pct"] = min(100.0, max(0.0, _pct(gen - b["grid_export"], gen))) if gen > 0 else 0.0
    return out


def _heat(b: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    produced = "generation" in b or "import" in b
    fed = b["feed"] if "feed" in b else (b.get("generation", 0.0) + b.get("import", 0.0) if produced else None)
    if fed is not None and "delivery" in b:
        out["network_loss"] = fed - b["delivery"]
        out["network_loss_pct"] = _pct(out["network_loss"], fed)
    if "feed" in b and produced:
        out["residual"] = b.get("generation", 0.0) + b.get("import", 0.0) - b["feed"]
    return out


def _water(b: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    v_in = b.get("supply", b.get("abstraction"))
    if v_in is not None and ("consumption" in b or "export" in b):
        out["non_revenue"] = v_in - b.get("consumption", 0.0) - b.get("export", 0.0)
    if "abstraction" in b and "supply" in b:
        out["residual"] = b["abstraction"] - b["supply"]
    if v_in is not None and "pumping_energy" in b:
        out["pumping_kwh_per_m3"] = b["pumping_energy"] / v_in if v_in > 0 else 0.0
    if "recycled" in b:
        fresh = b.get("abstraction", b.get("supply", 0.0))
        out["recycled_share_pct"] = _pct(b["recycled"], fresh + b["recycled"])
    return out


def _chp(b: dict[str, float]) -> dict[str, float]:
    out = {"power_to_heat": b["electricity"] / b["heat"] if b.get("heat", 0.0) > 0 else 0.0}
    if "fuel" in b:
        fuel = b["fuel"]
        out["eta_el_pct"] = _pct(b["electricity"], fuel)
        out["eta_th_pct"] = _pct(b["heat"], fuel)
        out["eta_total_pct"] = _pct(b["electricity"] + b["heat"], fuel)
    return out


_LOOPS = {"electricity": _electricity, "heat": _heat, "water": _water, "chp": _chp}


def derive(loop: str, base: dict[str, float]) -> dict[str, float]:
    """The loop's metrics from its summed base quantities (the n_* quality counts are ignored)."""
    fn = _LOOPS.get(loop)
    if fn is None:
        return {}
    return fn({k: v for k, v in base.items() if not k.startswith("n_") and k not in DERIVED})
