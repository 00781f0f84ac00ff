"""Which attention backend get_attention_backend picks, and the errors for choices that cannot work.
These run without a GPU and without the Triton interpreter; where the outcome depends on whether
triton imports or runs interpreted, that is patched."""

from __future__ import annotations

import pytest
import torch

import kernels.backend as backend_module
from kernels.backend import choose_attention_backend, get_attention_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture
def triton_missing(monkeypatch):
    def fake():  # what the triton factory's import raises on an install without triton
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setitem(backend_module.BACKENDS, "triton", fake)


@pytest.mark.parametrize("name", [None, "auto"])
def test_auto_on_cpu_is_sdpa(name):
    backend = get_attention_backend(name, CPU)
    assert backend.name == "sdpa" and backend.selection_reason == "sdpa: CPU device"


def test_auto_on_cuda_prefers_triton(monkeypatch):
    pytest.importorskip("triton")
    import kernels.triton_common

    monkeypatch.setattr(kernels.triton_common, "interpreter_enabled", lambda: False)
    name, reason = choose_attention_backend("auto", CUDA)
    assert name == "triton" and reason.startswith("triton: CUDA device and triton ")
    # Never the interpreter by default: it would run a GPU's attention on the CPU.
    monkeypatch.setattr(kernels.triton_common, "interpreter_enabled", lambda: True)
    assert choose_attention_backend("auto", CUDA)[0] == "sdpa"


def test_auto_on_cuda_without_triton_is_sdpa(triton_missing):
    name, reason = choose_attention_backend(None, CUDA)
    assert (name, reason) == ("sdpa", "sdpa: CUDA device, but the triton package is not installed")


def test_explicit_sdpa():
    assert get_attention_backend("sdpa", CPU).selection_reason == "sdpa: requested"


def test_triton_without_the_package_names_it(triton_missing):
    with pytest.raises(RuntimeError, match="'triton' is unavailable: the triton package is not installed; install"):
        get_attention_backend("triton", CUDA)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import kernels.triton_common

    monkeypatch.setattr(kernels.triton_common, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="runs only through the Triton interpreter .* TRITON_INTERPRET=1"):
        get_attention_backend("triton", CPU)
    monkeypatch.setattr(kernels.triton_common, "interpreter_enabled", lambda: True)
    backend = get_attention_backend("triton", CPU)
    assert backend.name == "triton" and "interpreter on CPU" in backend.selection_reason


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; available: sdpa, triton, or 'auto'"):
        get_attention_backend("flash", CPU)
