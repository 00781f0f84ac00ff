"""Choosing an attention backend (the interface is kernels/interface.py).

BACKENDS maps each name to a factory that imports its backend's module when called: triton, an optional
dependency, is imported only once its backend is asked for. The backends import only the interface,
never this module, so choosing and implementing form no import cycle.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.interface import AttentionBackend


def _sdpa() -> type[AttentionBackend]:
    from kernels.sdpa import SdpaBackend

    return SdpaBackend


def _triton() -> type[AttentionBackend]:
    from kernels.triton_backend import TritonBackend

    return TritonBackend


BACKENDS: dict[str, Callable[[], type[AttentionBackend]]] = {"sdpa": _sdpa, "triton": _triton}


def available_backends() -> list[str]:
    return sorted(BACKENDS)


def _load_triton() -> str:
    """Import the Triton backend and return triton's version; RuntimeError says what is missing."""
    try:
        BACKENDS["triton"]()
    except ImportError as exc:
        if exc.name == "triton":
            raise RuntimeError("the triton package is not installed") from exc
        raise RuntimeError(f"the Triton kernels failed to import ({exc})") from exc
    except (RuntimeError, OSError) as exc:  # a triton install that cannot find its driver or toolchain
        raise RuntimeError(f"triton failed to load ({exc})") from exc
    import triton

    return triton.__version__


def choose_attention_backend(name: str | None, device: torch.device) -> tuple[str, str]:
    """(backend name, one-line reason). name None or "auto": triton on CUDA when it imports, else sdpa."""
    device = torch.device(device)
    if name in (None, "auto"):
        if device.type != "cuda":
            return "sdpa", f"sdpa: {device.type.upper()} device"
        try:
            version = _load_triton()
        except RuntimeError as exc:
            return "sdpa", f"sdpa: CUDA device, but {exc}"
        from kernels.triton_common import interpreter_enabled

        if interpreter_enabled():
            return "sdpa", "sdpa: CUDA device, but TRITON_INTERPRET is set (triton would run on the CPU)"
        return "triton", f"triton: CUDA device and triton {version} available"
    if name not in available_backends():
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}, "
            "or 'auto' (triton on CUDA when installed, else sdpa)"
        )
    if name != "triton":
        return name, f"{name}: requested"
    try:
        version = _load_triton()
    except RuntimeError as exc:
        raise RuntimeError(
            f"attention backend 'triton' is unavailable: {exc}; install triton (pip install triton) "
            "or use attention backend 'sdpa'"
        ) from exc
    if device.type == "cuda":
        return name, f"triton: requested, triton {version} on CUDA"
    from kernels.triton_common import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError(
            f"attention backend 'triton' on a {device.type} device runs only through the Triton interpreter "
            "(slow, for tests): start the process with TRITON_INTERPRET=1 (triton reads it when first "
            "imported), or use attention backend 'sdpa'"
        )
    return name, f"triton: requested, triton {version} interpreter on {device.type.upper()} (slow)"


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """The backend for `name` ("sdpa", "triton", "auto" or None) on `device`. Its `selection_reason`
    says in one line what was picked and why, for the engine's log."""
    chosen, reason = choose_attention_backend(name, device)
    backend = BACKENDS[chosen]()()
    backend.selection_reason = reason
    return backend
