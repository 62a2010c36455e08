"""DPM-Solver++ for flow-matching models (``--scheduler dpm++``): the generators' name for the shared solver.

The implementation lives once in ``musubi_tuner.modules.flow_dpmpp`` (the trainers' samples use it too, and training
code may not import ``blissful_tuner``); this module re-exports it for the generate scripts.
"""

from __future__ import annotations

from musubi_tuner.modules.flow_dpmpp import TIMESTEP_SCALE, dpmpp_sample, flow_sigmas, make_flow_dpmpp_scheduler

__all__ = ["TIMESTEP_SCALE", "dpmpp_sample", "flow_sigmas", "make_flow_dpmpp_scheduler"]
