"""The per-device choices of parallelize, decided by the same functions on every device: what a GPU
run would get is checked here by asking for it, not by running it."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

from dist_audio.config import ConfigError, TrainConfig
from dist_audio.train.parallelize import check_precision_supported, fsdp2_policies


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_offloaded_fsdp2_shards_are_pinned_exactly_when_a_gpu_copies_them(device):
    policies = fsdp2_policies("bf16", offload=True, device=torch.device(device))
    for kind in ("fp32", "block", "root"):
        offload = policies[kind]["offload_policy"]
        assert isinstance(offload, CPUOffloadPolicy) and offload.pin_memory is (device == "cuda")
    assert type(fsdp2_policies("bf16", offload=False, device=torch.device(device))["block"]["offload_policy"]) \
        is OffloadPolicy


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("no", None)])
def test_fsdp2_units_gather_in_the_run_precision_and_keep_fp32_modules_and_reductions_fp32(precision, dtype):
    policies = fsdp2_policies(precision, offload=False, device=torch.device("cpu"))
    assert policies["block"]["mp_policy"].param_dtype is dtype
    assert policies["root"]["mp_policy"].param_dtype is dtype
    assert policies["fp32"]["mp_policy"].param_dtype is torch.float32
    if dtype is not None:
        assert all(policies[k]["mp_policy"].reduce_dtype is torch.float32 for k in policies)
        assert policies["root"]["mp_policy"].cast_forward_inputs is False  # float32 islands read the data as is
        assert policies["block"]["mp_policy"].cast_forward_inputs is True


def test_fp16_needs_cuda():
    check_precision_supported(TrainConfig(mixed_precision="fp16"), cuda=True)
    check_precision_supported(TrainConfig(mixed_precision="bf16"), cuda=False)
    with pytest.raises(ConfigError, match=r"train\.mixed_precision"):
        check_precision_supported(TrainConfig(mixed_precision="fp16"), cuda=False)
