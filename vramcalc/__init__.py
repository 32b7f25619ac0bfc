"""vramcalc: GPU memory, time and cost of LLM fine-tuning, checked against real runs.

The public API (``__all__``): one function per command (``plan``, ``sweep``, ``fit``,
``advise``, ``serve``, ``report``, ...; ``vramcalc.api``), the plans they take and the results
they return, and the errors they raise. Names load on first use, so ``import vramcalc`` is
quick and imports neither torch nor the estimator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_HOMES = {
    # the commands (vramcalc.api)
    "plan": "vramcalc.api",
    "sweep": "vramcalc.api",
    "fit": "vramcalc.api",
    "advise": "vramcalc.api",
    "serve": "vramcalc.api",
    "read_config": "vramcalc.api",
    "check": "vramcalc.api",
    "compare": "vramcalc.api",
    "report": "vramcalc.api",
    "speed_report": "vramcalc.api",
    "speed_fit": "vramcalc.api",
    "models": "vramcalc.api",
    "gpus": "vramcalc.api",
    # what they take
    "TrainingPlan": "vramcalc.training_plan",
    "ServePlan": "vramcalc.serve_plan",
    "FilePlan": "vramcalc.configs",
    "Gpu": "vramcalc.catalog",
    "DEFAULT_HEADROOM": "vramcalc.budget",
    # what they return
    "PlanResult": "vramcalc.planner",
    "MemoryEstimate": "vramcalc.estimate",
    "SweepResult": "vramcalc.sweeps",
    "FitResult": "vramcalc.fitting",
    "Advice": "vramcalc.advice",
    "CheckResult": "vramcalc.checking",
    "ServeResult": "vramcalc.serving.serve_planner",
    "GatedReport": "vramcalc.accuracy",
    "GatedSpeedReport": "vramcalc.speed.speed_report",
    "ThroughputFit": "vramcalc.speed.throughput_fit",
    # what they raise
    "VramcalcError": "vramcalc.errors",
    "InvalidPlanError": "vramcalc.errors",
    "UnknownModelError": "vramcalc.errors",
    "UnknownGpuError": "vramcalc.errors",
    "ConfigError": "vramcalc.errors",
    "ConfigFileError": "vramcalc.errors",
    "SimulationError": "vramcalc.errors",
}

__all__ = [
    "plan",
    "sweep",
    "fit",
    "advise",
    "serve",
    "read_config",
    "check",
    "compare",
    "report",
    "speed_report",
    "speed_fit",
    "models",
    "gpus",
    "TrainingPlan",
    "ServePlan",
    "FilePlan",
    "Gpu",
    "DEFAULT_HEADROOM",
    "PlanResult",
    "MemoryEstimate",
    "SweepResult",
    "FitResult",
    "Advice",
    "CheckResult",
    "ServeResult",
    "GatedReport",
    "GatedSpeedReport",
    "ThroughputFit",
    "VramcalcError",
    "InvalidPlanError",
    "UnknownModelError",
    "UnknownGpuError",
    "ConfigError",
    "ConfigFileError",
    "SimulationError",
]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from vramcalc.accuracy import GatedReport
    from vramcalc.advice import Advice
    from vramcalc.api import (
        advise,
        check,
        compare,
        fit,
        gpus,
        models,
        plan,
        read_config,
        report,
        serve,
        speed_fit,
        speed_report,
        sweep,
    )
    from vramcalc.budget import DEFAULT_HEADROOM
    from vramcalc.catalog import Gpu
    from vramcalc.checking import CheckResult
    from vramcalc.configs import FilePlan
    from vramcalc.errors import (
        ConfigError,
        ConfigFileError,
        InvalidPlanError,
        SimulationError,
        UnknownGpuError,
        UnknownModelError,
        VramcalcError,
    )
    from vramcalc.estimate import MemoryEstimate
    from vramcalc.fitting import FitResult
    from vramcalc.planner import PlanResult
    from vramcalc.serve_plan import ServePlan
    from vramcalc.serving.serve_planner import ServeResult
    from vramcalc.speed.speed_report import GatedSpeedReport
    from vramcalc.speed.throughput_fit import ThroughputFit
    from vramcalc.sweeps import SweepResult
    from vramcalc.training_plan import TrainingPlan


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'vramcalc' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
