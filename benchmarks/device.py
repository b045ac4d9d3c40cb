"""The device a cell runs on: resolving ``auto | cpu | cuda | cuda:N | mps``, what the result records about
it, and whether an inference dtype works there.

Training, trace collection and timing all run on the resolved device; risk control and every other
analysis run on the stored traces (CPU). A device that is not there is a one-line :class:`UserError`
before anything runs.
"""

from __future__ import annotations

import copy
import re
import subprocess
from typing import Any

import torch

from exitbench.core.errors import UserError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # training autocast


def check_device_name(spec: str, where: str = "evaluation.device") -> None:
    """The spelling of a device, checked without touching any hardware (config time)."""
    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec):
        raise UserError(f"{where}: {spec!r} is not a device; use {DEVICE_FORMS}")


def resolve_device(spec: str, where: str = "--device") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; anything else must exist on this machine."""
    check_device_name(spec, where)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{where}: mps is not available here (it needs Apple silicon with macOS and an MPS "
                            "build of torch); use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        built = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise UserError(f"{where}: {spec} requested but this machine has {built}; use --device cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"{where}: {spec} requested but this machine has {count} CUDA device"
                        f"{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); "
                        "pick one of those")
    return torch.device("cuda", index)


def prepare(device: torch.device) -> None:
    """Per-device settings made before a cell runs (recorded by :func:`device_env`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels


def device_env(device: torch.device, dtype: str = "float32") -> dict[str, Any]:
    """What a result records about its device: name, driver, CUDA and cuDNN versions, the dtype timed."""
    env: dict[str, Any] = {"device": str(device), "dtype": dtype, **precision_flags()}
    if device.type == "cuda":
        env.update({"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "driver": _nvidia_driver(), "capability": ".".join(map(str, torch.cuda.get_device_capability(
                        device)))})
    elif device.type == "mps":
        env["device_name"] = "Apple MPS"
    return env


def precision_flags() -> dict[str, Any]:
    """The float32 precision settings that change logits (TF32 on CUDA turns fp32 matmuls and convolutions
    into ~1e-3-relative ones): recorded with every result, since two paths can then disagree near a threshold."""
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_dtype(model: torch.nn.Module, sample: torch.Tensor, dtype: str, device: torch.device,
                where: str = "evaluation.dtype") -> torch.dtype:
    """The torch dtype for ``dtype``, after one forward of ``model`` on ``sample`` in it on ``device``
    (whether a dtype works depends on the device, the torch build and the layers)."""
    if dtype not in DTYPES:
        raise UserError(f"{where}: unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    t = DTYPES[dtype]
    if t is torch.float32:
        return t
    try:
        with torch.no_grad():
            in_dtype(model, device, t)(sample[:1].to(device, t))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise UserError(f"{where}: {dtype} does not run on {device} for this network ({_first_line(e)}); use "
                        "float32, or another device") from None
    return t


def in_dtype(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype``: the model itself in float32, otherwise a converted copy. Why a
    copy: converting the trained model to bfloat16 and back would round its weights for good (and a cached
    backbone is shared by every later cell of the run)."""
    if dtype is torch.float32:
        return model.to(device)
    return copy.deepcopy(model).to(device, dtype)


def check_precision(precision: str, device: torch.device, where: str) -> torch.dtype | None:
    """The autocast dtype of a training ``precision`` (fp32: None) on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"{where}: unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{where}: fp16 training needs CUDA (loss scaling); use bf16 on {device.type}, or fp32")
    return PRECISIONS[precision]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__
