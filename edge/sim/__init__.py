"""The site simulator: a physically consistent KWWK cell served over Modbus, for demos and tests."""

from edge.sim.site import SimClock, Site
from edge.sim.server import SimulatorServer

__all__ = ["SimClock", "SimulatorServer", "Site"]
