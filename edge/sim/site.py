"""Physics of a simulated cell.

Demands drive everything: heat demand sets the CHP, water demand sets the pumps, and every
cumulative counter is the integral of its own power or flow, so a balance computed from the
counters has a known answer (kept here, unrounded, as ground truth).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from edge.cell import CellConfig, Device

__all__ = ["SimClock", "Site"]

WATER_KWH_PER_M3K = 1.163  # heat carried by 1 m³ of water per kelvin


@dataclass
class SimClock:
    """Simulated time: real time by default; `speed` > 1 runs a day in minutes."""

    start: float | None = None  # simulated epoch seconds at t0; None = now
    speed: float = 1.0
    _t0: float = field(default_factory=time.time)

    def now(self) -> float:
        base = self.start if self.start is not None else self._t0
        return base + (time.time() - self._t0) * self.speed


def _daily(hour: float, low: float, high: float, peak_hour: float, width: float = 4.0) -> float:
    """A smooth day curve between low and high with its peak at peak_hour."""
    d = min(abs(hour - peak_hour), 24 - abs(hour - peak_hour))
    return low + (high - low) * math.exp(-(d / width) ** 2)


def _seasonal(day_of_year: int) -> float:
    """1 in midwinter, 0 in midsummer."""
    return 0.5 + 0.5 * math.cos(2 * math.pi * (day_of_year - 15) / 365)


class Site:
    """All devices of one cell, advanced together in time."""

    def __init__(self, cfg: CellConfig, start: float) -> None:
        self.cfg = cfg
        self.t = start
        self.tz = ZoneInfo(cfg.cell.timezone)
        self.devices: dict[str, Device] = {d.id: d for _, d in cfg.devices() if d.sim is not None}
        #: current value of every simulated quantity, by device then point
        self.state: dict[str, dict[str, float]] = {d: {} for d in self.devices}
        #: exact counters (never rounded, never encoded): the ground truth for balance tests
        self.truth: dict[str, dict[str, float]] = {d: {} for d in self.devices}
        #: values pinned by a Modbus write or a test; they override the physics
        self.pinned: dict[str, dict[str, float]] = {d: {} for d in self.devices}
        for dev_id, dev in self.devices.items():
            assert dev.sim is not None
            initial = dict(dev.sim.model_extra or {}).get("initial", {})
            for name in ("energy_import", "energy_export", "heat_energy", "volume", "runtime", "starts"):
                self.truth[dev_id][name] = float(initial.get(name, 1000.0 if name != "starts" else 100.0))
        self._publish(self._compute(start))

    # -- physics -----------------------------------------------------------------------------
    def _param(self, dev: Device, name: str, default: float) -> float:
        assert dev.sim is not None
        return float(dict(dev.sim.model_extra or {}).get(name, default))

    def _compute(self, t: float) -> dict[str, dict[str, float]]:
        """Instantaneous powers and flows at t (kW, m³/h) for every device, without touching counters."""
        sim = self.cfg.simulation
        local = datetime.fromtimestamp(t, UTC).astimezone(self.tz)
        hour = local.hour + local.minute / 60 + local.second / 3600
        winter = _seasonal(local.timetuple().tm_yday)
        heat_base = sim.heat_demand_kw[0] + (sim.heat_demand_kw[1] - sim.heat_demand_kw[0]) * winter * 0.7
        heat_consumers_kw = _daily(hour, heat_base * 0.8, heat_base + (sim.heat_demand_kw[1] - heat_base) * 0.6, 7.0, 3.0)
        water_consumers = _daily(hour, sim.water_demand_m3h[0], sim.water_demand_m3h[1], 7.5, 2.0) \
            + 0.4 * _daily(hour, 0, sim.water_demand_m3h[1], 19.0, 2.0)
        village_kw = _daily(hour, sim.village_load_kw[0], sim.village_load_kw[1], 18.5, 3.0)
        fed_kw = heat_consumers_kw / (1 - sim.heat_network_loss)
        supply_m3h = water_consumers / (1 - sim.water_network_loss)
        abstraction_m3h = supply_m3h / (1 - sim.treatment_loss)

        out: dict[str, dict[str, float]] = {}
        by_model: dict[str, list[Device]] = {}
        for dev in self.devices.values():
            assert dev.sim is not None
            by_model.setdefault(dev.sim.model, []).append(dev)

        gen_kw = 0.0
        load_kw = village_kw
        chp_fuel_kw: dict[str, float] = {}
        for dev in by_model.get("chp", []):
            el_rated = self._param(dev, "rated_el_kw", 50.0)
            th_rated = self._param(dev, "rated_th_kw", 100.0)
            share = fed_kw / max(1, len(by_model["chp"]))
            th = min(th_rated, share)
            el = th * el_rated / th_rated
            eta = self._param(dev, "total_efficiency", 0.88)
            chp_fuel_kw[dev.id] = (el + th) / eta
            gen_kw += el
            out[dev.id] = {"power": el * 1000, "heat_power": th * 1000, "temp_supply": 80.0, "temp_return": 55.0,
                           "_run": 1.0 if el > 0 else 0.0}
        for dev in by_model.get("pv", []):
            kwp = self._param(dev, "kwp", 30.0)
            irradiance = max(0.0, math.sin(math.pi * (hour - 5.5) / 15)) ** 1.5 * (0.55 + 0.45 * (1 - winter))
            kw = kwp * 0.85 * irradiance
            gen_kw += kw
            out[dev.id] = {"power": kw * 1000, "dc_power": kw * 1030, "voltage_l1": 231.0, "voltage_l2": 230.5,
                           "voltage_l3": 229.8, "frequency": 50.0, "current_l1": kw * 1000 / 3 / 231.0,
                           "current_l2": kw * 1000 / 3 / 230.5, "current_l3": kw * 1000 / 3 / 229.8}
        for dev in by_model.get("gas", []):
            of = dict(dev.sim.model_extra or {}).get("of") if dev.sim else None
            fuel_kw = chp_fuel_kw.get(str(of), sum(chp_fuel_kw.values()))
            m3h = fuel_kw / (self.cfg.fuel.calorific_value_kwh_m3 * self.cfg.fuel.correction_factor)
            out[dev.id] = {"flow": m3h}
        for dev in by_model.get("pump", []):
            feeds = dict(dev.sim.model_extra or {}).get("feeds", "abstraction") if dev.sim else "abstraction"
            flow = abstraction_m3h if feeds == "abstraction" else supply_m3h
            kwh_per_m3 = self._param(dev, "kwh_per_m3", 0.45 if feeds == "abstraction" else 0.25)
            kw = flow * kwh_per_m3 + self._param(dev, "idle_kw", 0.3)
            load_kw += kw
            out[dev.id] = {"power": kw * 1000, "flow": flow, "head": self._param(dev, "head_m", 45.0),
                           "speed": 1450.0 * min(1.0, flow / max(1e-6, sim.water_demand_m3h[1])) + 600, "_run": 1.0}
        delta_t = 25.0
        for dev in by_model.get("heat_feed", []):
            kw = fed_kw / len(by_model["heat_feed"])
            out[dev.id] = {"heat_power": kw * 1000, "flow": kw / (WATER_KWH_PER_M3K * delta_t),
                           "temp_supply": 80.0, "temp_return": 80.0 - delta_t, "temp_diff": delta_t}
        consumers = by_model.get("heat_consumer", [])
        for dev in consumers:
            share = self._param(dev, "share", 1.0 / len(consumers))
            kw = heat_consumers_kw * share
            out[dev.id] = {"heat_power": kw * 1000, "flow": kw / (WATER_KWH_PER_M3K * (delta_t - 2)),
                           "temp_supply": 78.0, "temp_return": 78.0 - (delta_t - 2), "temp_diff": delta_t - 2}
        for model, flow_total in (("water_abstraction", abstraction_m3h), ("water_supply", supply_m3h),
                                  ("water_consumer", water_consumers)):
            devs = by_model.get(model, [])
            for dev in devs:
                share = self._param(dev, "share", 1.0 / len(devs))
                out[dev.id] = {"flow": flow_total * share}
        net_kw = load_kw - gen_kw
        for dev in by_model.get("grid", []):
            out[dev.id] = {"power": net_kw * 1000, "voltage_l1": 230.2, "voltage_l2": 231.1, "voltage_l3": 229.5,
                           "frequency": 50.0, "current_l1": abs(net_kw) * 1000 / 3 / 230.2,
                           "current_l2": abs(net_kw) * 1000 / 3 / 231.1, "current_l3": abs(net_kw) * 1000 / 3 / 229.5,
                           "power_l1": net_kw * 1000 / 3, "power_l2": net_kw * 1000 / 3, "power_l3": net_kw * 1000 / 3}
        for dev in by_model.get("static", []):
            out[dev.id] = {}
        return out

    def _rates(self, dev_id: str, now: dict[str, float]) -> dict[str, float]:
        """Counter increments per hour implied by the instantaneous values (kWh/h, m³/h, h/h)."""
        dev = self.devices[dev_id]
        assert dev.sim is not None
        model = dev.sim.model
        rates: dict[str, float] = {}
        if model in ("chp", "pv"):
            rates["energy_export"] = now["power"] / 1000
        if model == "chp":
            rates["heat_energy"] = now["heat_power"] / 1000
        if model in ("heat_feed", "heat_consumer"):
            rates["heat_energy"] = now["heat_power"] / 1000
            rates["volume"] = now["flow"]
        if model in ("gas", "water_abstraction", "water_supply", "water_consumer"):
            rates["volume"] = now["flow"]
        if model == "pump":
            rates["energy_import"] = now["power"] / 1000
        if model == "grid":
            rates["energy_import"] = max(0.0, now["power"]) / 1000
            rates["energy_export"] = max(0.0, -now["power"]) / 1000
        if now.get("_run"):
            rates["runtime"] = 1.0
        return rates

    def advance(self, t: float) -> None:
        """Move to time t, integrating every counter (trapezoid rule, in steps of at most 10 s)."""
        if t <= self.t:
            return
        steps = max(1, math.ceil((t - self.t) / 10.0))
        dt = (t - self.t) / steps
        before = self._compute(self.t)
        for i in range(1, steps + 1):
            after = self._compute(self.t + i * dt)
            for dev_id in self.devices:
                r0 = self._rates(dev_id, before.get(dev_id, {}))
                r1 = self._rates(dev_id, after.get(dev_id, {}))
                for name, rate in r0.items():
                    self.truth[dev_id][name] += (rate + r1.get(name, rate)) / 2 * dt / 3600
            before = after
        self.t = t
        self._publish(before)

    def _publish(self, values: dict[str, dict[str, float]]) -> None:
        for dev_id in self.devices:
            state = {k: v for k, v in values.get(dev_id, {}).items() if not k.startswith("_")}
            state.update(self.truth[dev_id])
            state.update(self.pinned[dev_id])
            self.state[dev_id] = state

    def pin(self, device: str, point: str, value: float) -> None:
        """Hold a point at a value (a technician's write, a test's fault injection)."""
        self.pinned[device][point] = value
        self.state[device][point] = value
