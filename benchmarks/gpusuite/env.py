"""What this process can run: the device, and whether the Triton kernels execute here.

Triton decides at its first import whether kernels are compiled or interpreted on the CPU
(TRITON_INTERPRET=1), so the suite only observes the mode: it cannot switch it after start-up.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Env:
    device: torch.device
    device_name: str
    triton_version: str | None
    triton_runs: bool  # the Triton kernels can execute in this process
    triton_mode: str  # "compiled", "interpreter", or why they cannot run
    num_sms: int  # streaming multiprocessors (CUDA); what TritonBackend assumes off CUDA otherwise

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": self.triton_version,
            "triton_mode": self.triton_mode,
            "num_sms": self.num_sms,
            "python": platform.python_version(),
        }


def detect_env() -> Env:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    version, runs, mode = _triton_status(cuda)
    if cuda:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _off_cuda_sms() if runs else 0
    return Env(device, name, version, runs, mode, sms)


def _triton_status(cuda: bool) -> tuple[str | None, bool, str]:
    try:
        import triton

        from kernels.triton_common import interpreter_enabled
    except Exception as exc:  # noqa: BLE001 - a missing or broken triton is a reason to skip, not to stop
        return None, False, f"triton unavailable ({type(exc).__name__}: {exc})"
    interpreted = interpreter_enabled()
    if cuda and interpreted:
        return triton.__version__, False, "TRITON_INTERPRET is set: the kernels would run on the CPU, not the GPU"
    if cuda:
        return triton.__version__, True, "compiled"
    if interpreted:
        return triton.__version__, True, "interpreter"
    return triton.__version__, False, "no CUDA device, and TRITON_INTERPRET=1 was not set at process start"


def _off_cuda_sms() -> int:
    from kernels.triton_backend import TritonBackend

    return TritonBackend.num_sms_off_cuda
