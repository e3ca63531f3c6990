"""Which balance figures the public may see: none that would reveal a single customer's meter.

A meter marked `consumer: true` meters one household or customer. A role total (say heat delivery) that
sums consumer meters is public only when it sums at least K_MIN of them; with one or two it would be
their consumption, so it is withheld, and so is every figure computed from it (network loss from
feed − delivery, for one). Roles metered by the utility's own meters (generation, grid, wells, pumps,
network feed) are always public. The public never sees a single meter: the generation split by kind
(sun, CHP) sums only the utility's own generators, households' generators only as a group of K_MIN or more.

Totals grow every 15 minutes, so two answers a quarter of an hour apart give that quarter's total: it
too must sum K_MIN customers. A total of customer meters is therefore also withheld (in every window)
while one of its customer meters lags behind the rest of its loop today (`lagging_roles`): a meter
that stopped, or whose latest readings have not arrived yet.
"""

from __future__ import annotations

from collections import Counter

from collector.balance.spec import CellSpec

__all__ = ["FIGURE_DEPS", "K_MIN", "consumer_counts", "consumer_devices", "lagging_roles", "published",
           "withheld_roles"]

K_MIN = 3

#: public figure → the base quantities (roles) it is computed from, per loop
FIGURE_DEPS: dict[str, dict[str, frozenset[str]]] = {
    "electricity": {
        "generation": frozenset({"generation"}),
        "grid_import": frozenset({"grid_import"}),
        "grid_export": frozenset({"grid_export"}),
        "consumption": frozenset({"consumption"}),
        "storage_charge": frozenset({"storage_charge"}),
        "storage_discharge": frozenset({"storage_discharge"}),
        "used_in_cell": frozenset({"grid_import", "generation", "storage_discharge", "grid_export", "storage_charge"}),
        "self_sufficiency_pct": frozenset({"grid_import", "generation", "storage_discharge", "grid_export",
                                           "storage_charge"}),
        "self_consumption_pct": frozenset({"generation", "grid_export"}),
    },
    "heat": {
        "generation": frozenset({"generation"}),
        "imported": frozenset({"import"}),
        "fed": frozenset({"feed", "generation", "import"}),
        "delivered": frozenset({"delivery"}),
        "network_loss": frozenset({"feed", "generation", "import", "delivery"}),
        "network_loss_pct": frozenset({"feed", "generation", "import", "delivery"}),
        "plant_residual": frozenset({"generation", "import", "feed"}),
        "local_share_pct": frozenset({"generation", "import"}),
    },
    "water": {
        "abstraction": frozenset({"abstraction"}),
        "supply": frozenset({"supply"}),
        "consumption": frozenset({"consumption"}),
        "export": frozenset({"export"}),
        "recycled": frozenset({"recycled"}),
        "non_revenue": frozenset({"supply", "abstraction", "consumption", "export"}),
        "non_revenue_pct": frozenset({"supply", "abstraction", "consumption", "export"}),
        "treatment_loss": frozenset({"abstraction", "supply"}),
        "pumping_energy": frozenset({"pumping_energy"}),
        "pumping_kwh_per_m3": frozenset({"pumping_energy", "supply", "abstraction"}),
        "recycled_share_pct": frozenset({"recycled", "abstraction", "supply"}),
    },
}


def consumer_devices(spec: CellSpec) -> dict[str, set[str]]:
    """The consumer meters behind each "loop.role" (and water.pumping_energy, the pumps' electricity)."""
    out: dict[str, set[str]] = {}
    for s in spec.series:
        if not s.consumer:
            continue
        out.setdefault(s.loop_role, set()).add(s.device)
        if s.loop_role == "electricity.consumption" and s.device_class == "pump":
            out.setdefault("water.pumping_energy", set()).add(s.device)
    return out


def consumer_counts(spec: CellSpec) -> Counter[str]:
    return Counter({k: len(v) for k, v in consumer_devices(spec).items()})


def lagging_roles(spec: CellSpec, loop_intervals: dict[str, int], meter_intervals: dict[str, int]) -> frozenset[str]:
    """"loop.role" totals with a customer meter that has fewer of today's 15-minute values than its loop
    has rows (loop → rows today; device → values today)."""
    lagging = set()
    for key, devices in consumer_devices(spec).items():
        loop = "electricity" if key == "water.pumping_energy" else key.split(".", 1)[0]
        if any(meter_intervals.get(d, 0) < loop_intervals.get(loop, 0) for d in devices):
            lagging.add(key)
    return frozenset(lagging)


def withheld_roles(spec: CellSpec) -> frozenset[str]:
    """"loop.role" totals that sum one or two consumer meters."""
    return frozenset(k for k, n in consumer_counts(spec).items() if 0 < n < K_MIN)


def published(withheld: frozenset[str], loop: str, figure: str) -> bool:
    deps = FIGURE_DEPS[loop][figure]
    return not any(f"{loop}.{d}" in withheld for d in deps)
