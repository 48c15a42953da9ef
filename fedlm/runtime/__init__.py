"""Runtimes build a federation from a config and drive its round loop: the in-process simulation
(`local`, the default) and Flower's deployment engine (`flower`, needs `fedlm[flower]`)."""

from fedlm.runtime.local import build_simulation
from fedlm.runtime.rounds import Federation, run_federation

__all__ = ["Federation", "build_simulation", "run_federation"]
