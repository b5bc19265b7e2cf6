"""Device layer: device/dtype resolution (CUDA/NPU faked on CPU), seeding and RNG state capture."""

import io
import logging
import random
import sys

import numpy as np
import pytest
import torch

from tinytune import device as dev
from tinytune.device import DeviceError, get_device, get_dtype, rng_state, set_rng_state, set_seed


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(dev, "_cuda_available", lambda: False)
    monkeypatch.setattr(dev, "_npu_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend two CUDA devices exist; records set_device calls."""
    calls = []
    monkeypatch.setattr(dev, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(i))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return calls


# torch_npu renames torch's PrivateUse1 backend to "npu" on import, process-wide and for good;
# a renamed backend without a real torch.npu module breaks later tests (autocast, FSDP, DCP).
# So the NPU paths are exercised in a child process with a stand-in torch_npu.
_FAKE_NPU = """
import sys, types, torch
from tinytune import device as dev
from tinytune.device import DeviceError, get_device, get_dtype
torch.utils.rename_privateuse1_backend("npu")
calls = []
torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, set_device=calls.append,
                                  is_bf16_supported=lambda: False)
sys.modules["torch_npu"] = types.ModuleType("torch_npu")
dev._npu_installed = lambda: True
"""


def _run_with_fake_npu(body: str) -> None:
    import subprocess
    import textwrap

    code = _FAKE_NPU + textwrap.dedent(body) + "\nprint('OK')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def test_cpu_and_auto_fallback(no_accelerators):
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_prefers_cuda(fake_cuda):
    assert get_device("auto") == torch.device("cuda", 0)
    assert fake_cuda == [0]


def test_cuda_index_and_local_rank(fake_cuda, monkeypatch):
    assert get_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert get_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="only 2 device"):
        get_device("cuda:2")


def test_cuda_missing_is_a_clear_error(no_accelerators):
    with pytest.raises(DeviceError, match="CUDA is not available.*device=cpu"):
        get_device("cuda")


def test_npu_paths_with_stand_in_torch_npu():
    _run_with_fake_npu("""
        dev._cuda_available = lambda: True
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda i: None
        assert get_device("auto") == torch.device("cuda", 0)   # CUDA wins over NPU
        dev._cuda_available = lambda: False
        assert get_device("auto") == torch.device("npu", 0)    # then NPU
        assert calls == [0]
        try:
            get_dtype("bf16", torch.device("npu", 0))          # the NPU's own bf16 probe is used
        except DeviceError as e:
            assert "bfloat16" in str(e)
        else:
            raise AssertionError("bf16 on an NPU without bf16 support must fail")
    """)


def test_auto_skips_npu_when_torch_npu_absent(monkeypatch):
    monkeypatch.setattr(dev, "_cuda_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    monkeypatch.setattr(dev, "_npu_installed", lambda: False)
    assert get_device("auto") == torch.device("cpu")


def test_npu_without_torch_npu_names_extra_and_cann(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail
    with pytest.raises(DeviceError) as e:
        get_device("npu")
    assert "tinytune[npu]" in str(e.value) and "CANN" in str(e.value)


def test_mps_missing(no_accelerators):
    with pytest.raises(DeviceError, match="MPS is not available"):
        get_device("mps")


@pytest.mark.parametrize("name", ["gpu", "cdua", "cuda:x", "tpu:0"])
def test_unknown_device(name):
    with pytest.raises(DeviceError, match="unknown device"):
        get_device(name)


def test_unknown_device_suggests():
    with pytest.raises(DeviceError, match="'cuda'"):
        get_device("cdua")


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("torch.float32", torch.float32),
        (None, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_names_on_cpu(name, dtype):
    assert get_dtype(name, "cpu") == dtype


def test_fp16_refused_on_cpu_allowed_on_cuda(fake_cuda):
    with pytest.raises(DeviceError, match="fp16 training on CPU"):
        get_dtype("fp16", torch.device("cpu"))
    assert get_dtype("fp16", torch.device("cuda", 0)) == torch.float16


def test_bf16_on_cuda_needs_support(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(DeviceError, match="does not support bfloat16"):
        get_dtype("bf16", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert get_dtype("bf16", "cuda:0") == torch.bfloat16


def test_unknown_dtype():
    with pytest.raises(DeviceError, match="unknown dtype 'bf61'"):
        get_dtype("bf61")
    with pytest.raises(DeviceError, match="not a training dtype"):
        get_dtype(torch.float64)


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist())


def test_set_seed_reproducible():
    assert set_seed(1234) == 1234
    a = _draws()
    set_seed(1234)
    assert _draws() == a
    set_seed(1235)
    assert _draws() != a


def test_set_seed_none_draws_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="tinytune.device"):
        seed = set_seed(None)
    assert 0 <= seed < 2**32 and str(seed) in caplog.text
    a = _draws()
    set_seed(seed)
    assert _draws() == a


def test_set_seed_rejects_out_of_range():
    with pytest.raises(ValueError, match="seed must be in"):
        set_seed(-1)


def test_deterministic_flag():
    try:
        set_seed(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_seed(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_rng_state_round_trip_through_torch_save():
    set_seed(7)
    _draws()
    state = rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = _draws()
    set_seed(99)  # scramble
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert _draws() == expected


def test_rng_state_with_gaussian_cache():
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached value in Python's generator state
    np.random.seed(3)
    np.random.standard_normal()
    state = rng_state()
    expected = (random.gauss(0, 1), float(np.random.standard_normal()))
    set_rng_state(state)
    assert (random.gauss(0, 1), float(np.random.standard_normal())) == expected


def test_cuda_state_without_cuda_warns(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING, logger="tinytune.device"):
        set_rng_state(state)
    assert "CUDA" in caplog.text


@pytest.mark.gpu
def test_cuda_device_dtype_and_rng_round_trip():
    device = get_device("auto")
    assert device.type == "cuda"
    if torch.cuda.is_bf16_supported():
        assert get_dtype("bf16", device) == torch.bfloat16
    set_seed(5)
    torch.rand(4, device=device)
    state = rng_state()
    assert "cuda" in state
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = (torch.rand(4, device=device).tolist(), torch.rand(2).tolist())
    set_seed(6)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert (torch.rand(4, device=device).tolist(), torch.rand(2).tolist()) == expected
