"""Ahead-of-time compilation of small inference steps (torch.export + AOTInductor).

A recurrent step at batch 16 is a few hundred tiny ops; run eagerly it costs mostly dispatcher and
Python time, and ``torch.compile`` still spends ~0.25 ms per call evaluating guards over every weight
and state tensor. Exported and compiled ahead of time, the step becomes one shared library of fused
C++ loops and GEMM calls that is called with plain tensors: no guards, no Python per op.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


def compile_ahead_of_time(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> Callable[..., Tensor]:
    """``module``'s forward (tensors in, one tensor out) compiled for inputs shaped like ``example_inputs``.

    Weights are copied into the compiled library (later changes to the module are not seen); in-place
    updates of the inputs, such as recurrent states, are kept. Needs a C++ compiler and takes tens of
    seconds per call, so it pays off for long runs of the same step.
    """
    program = torch.export.export(module, example_inputs)
    with tempfile.TemporaryDirectory(prefix="dist_audio_aot_") as tmp:
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "step.pt2"))
        loader = torch._inductor.aoti_load_package(package).loader
    # the loaded model's __call__ re-parses its input/output tree specs on every call (~0.1 ms); with flat
    # tensors in and one out, the underlying runner is called directly
    return lambda *inputs: loader.boxed_run(list(inputs))[0]
