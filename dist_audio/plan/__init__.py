"""Memory planner: what fits on which GPUs, before anything is launched.

Model states (parameters, gradients, optimizer) are computed from the real parameter count and each
engine's layout (``model_states``); activations and temporaries are measured by tracing one real
training step on fake tensors (``trace``); ``planner`` combines them per strategy and picks what to
launch; ``report`` prints, serialises and plots the result. ``launch/plan.py`` is the command line.
"""

from dist_audio.plan.model_states import STRATEGIES, ModelStates, ParamLayout, model_states, param_layout
from dist_audio.plan.planner import (
    Plan,
    Planner,
    Row,
    check_inputs,
    config_workload,
    make_plan,
    parse_memory,
    predict,
)
from dist_audio.plan.report import format_json, format_text, plot
from dist_audio.plan.trace import OptimizerTrace, StepTrace, Tracer, Workload

__all__ = [
    "STRATEGIES",
    "ModelStates",
    "OptimizerTrace",
    "ParamLayout",
    "Plan",
    "Planner",
    "Row",
    "StepTrace",
    "Tracer",
    "Workload",
    "check_inputs",
    "config_workload",
    "format_json",
    "format_text",
    "make_plan",
    "model_states",
    "param_layout",
    "parse_memory",
    "plot",
    "predict",
]
