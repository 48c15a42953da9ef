"""Runtimes drive the round loop: in-process simulation (default); a deployment engine later."""

from fedlm.runtime.local import Simulation, build_simulation, run_simulation

__all__ = ["Simulation", "build_simulation", "run_simulation"]
