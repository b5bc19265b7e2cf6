"""Device, dtype and random-seed handling for recipes.

* :func:`get_device` turns ``"auto" | "cpu" | "cuda" | "cuda:1" | "npu" | "mps"`` into a
  ``torch.device`` (``auto``: CUDA, then Ascend NPU when ``torch_npu`` is installed, then Apple
  MPS, then CPU). Under ``torchrun`` a bare ``"cuda"``/``"npu"`` means the local rank's device.
* :func:`get_dtype` maps ``"bf16" | "fp32" | "fp16"`` (and long names) to a ``torch.dtype`` and
  refuses combinations the device cannot train in.
* :func:`set_seed`, :func:`rng_state`, :func:`set_rng_state` seed, capture and restore the Python,
  NumPy, torch CPU and accelerator generators (the training-state checkpoint stores them for an
  exact resume).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tinytune.config._errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

DEVICE_TYPES = ("auto", "cpu", "cuda", "npu", "mps")

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


class DeviceError(ConfigError):
    """The requested device or dtype is not usable on this machine; the message says why.

    A ``ConfigError`` so that recipe entry points print it as a config problem, without a traceback.
    """


# ----------------------------------------------------------------------------------------------
# availability probes (separate functions so tests can monkeypatch them)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def _import_torch_npu() -> Any:
    """Import ``torch_npu`` (registers ``torch.npu``) or explain how to get it."""
    try:
        return importlib.import_module("torch_npu")
    except ModuleNotFoundError as e:
        raise DeviceError(
            "device 'npu' needs the Ascend PyTorch adapter torch_npu, which is not installed. "
            "Install the Ascend CANN toolkit, then `pip install 'tinytune[npu]'` (a torch_npu "
            "build matching your torch version), and source CANN's set_env.sh."
        ) from e


def _npu_available() -> bool:
    if not _npu_installed():
        return False
    try:
        _import_torch_npu()
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a broken CANN install means "no NPU" for auto
        return False


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _local_rank() -> int | None:
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None and value.isdigit() else None


# ----------------------------------------------------------------------------------------------
# devices


def get_device(name: str | torch.device = "auto") -> torch.device:
    """Resolve a device name and check that the device is usable.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"npu"``, ``"npu:N"``, ``"mps"``
            or a ``torch.device``. ``auto`` picks CUDA > NPU (only if ``torch_npu`` is
            installed) > MPS > CPU. A bare ``cuda``/``npu`` uses ``LOCAL_RANK`` when set (torchrun).

    Returns:
        The ``torch.device``; for CUDA/NPU it is also made the current device.

    Raises:
        DeviceError: Unknown name, device not present, index out of range, or ``torch_npu``
            missing for ``npu`` (the message names the ``tinytune[npu]`` extra and CANN).
    """
    text = str(name).strip().lower()
    if text == "auto":
        if _cuda_available():
            text = "cuda"
        elif _npu_available():
            text = "npu"
        elif _mps_available():
            text = "mps"
        else:
            text = "cpu"
    kind, _, index_text = text.partition(":")
    if kind not in DEVICE_TYPES or (index_text and not index_text.isdigit()):
        raise DeviceError(
            f"unknown device {str(name)!r}: use one of auto, cpu, cuda, cuda:N, npu, npu:N, mps."
            + did_you_mean(kind, DEVICE_TYPES)
        )
    index = int(index_text) if index_text else None

    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' requested but Apple MPS is not available (macOS with Apple silicon only).")
        return torch.device("mps")
    if kind == "cuda":
        if not _cuda_available():
            raise DeviceError(
                f"device {text!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); use device=cpu or install a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        index = _pick_index(index, count, text)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    # npu
    _import_torch_npu()
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        raise DeviceError(
            "device 'npu' requested: torch_npu is installed but reports no NPU (check CANN and the driver)."
        )
    index = _pick_index(index, npu.device_count(), text)
    npu.set_device(index)
    return torch.device("npu", index)


def _pick_index(index: int | None, count: int, text: str) -> int:
    if index is None:
        index = _local_rank() or 0
    if index >= count:
        raise DeviceError(f"device {text!r} (index {index}) requested but only {count} device(s) are visible.")
    return index


# ----------------------------------------------------------------------------------------------
# dtypes


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "npu":
        probe = getattr(torch.npu, "is_bf16_supported", None)  # type: ignore[attr-defined]
        return bool(probe()) if probe is not None else True
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            return True
        except (RuntimeError, TypeError):
            return False
    return True  # CPU kernels cover bf16


def get_dtype(name: str | torch.dtype | None = "fp32", device: torch.device | str | None = None) -> torch.dtype:
    """Map a dtype name to a ``torch.dtype`` and check the device can train in it.

    Args:
        name: ``"bf16"``/``"bfloat16"``, ``"fp32"``/``"float32"``, ``"fp16"``/``"float16"``, a
            ``torch.dtype``, or None (fp32).
        device: Where training runs (default CPU). bf16 on CUDA needs
            ``torch.cuda.is_bf16_supported()`` (Ampere or newer); fp16 is refused on CPU, where
            half-precision kernels are incomplete and there is no loss scaling: use bf16 or fp32.

    Returns:
        The ``torch.dtype``.

    Raises:
        DeviceError: Unknown name or a dtype the device lacks.
    """
    if name is None:
        dtype = torch.float32
    elif isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise DeviceError(f"unknown dtype {str(name)!r}: use bf16, fp32 or fp16." + did_you_mean(key, _DTYPES))
        dtype = _DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DeviceError(f"dtype {dtype} is not a training dtype: use bf16, fp32 or fp16.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dtype == torch.bfloat16 and not _bf16_supported(dev):
        raise DeviceError(
            f"bf16 requested but {dev} does not support bfloat16 (CUDA needs compute capability 8.0+); "
            "use dtype=fp32 (or fp16 on GPU)."
        )
    if dtype == torch.float16 and dev.type == "cpu":
        raise DeviceError(
            "fp16 training on CPU is not supported (slow, incomplete kernels, no loss scaling): use dtype=bf16 or fp32."
        )
    return dtype


# ----------------------------------------------------------------------------------------------
# seeds and RNG state

_MAX_SEED = 2**32 - 1  # NumPy's limit


def set_seed(seed: int | None = None, deterministic: bool = False) -> int:
    """Seed Python, NumPy and torch (CPU and every accelerator) generators.

    Args:
        seed: The seed in ``[0, 2**32 - 1]``; None draws a random one and logs it. Under
            ``torch.distributed`` a drawn seed is broadcast from rank 0 so all ranks agree.
        deterministic: Also ask torch for deterministic algorithms (and cuDNN without
            autotuning); errors out on ops that have no deterministic version.

    Returns:
        The seed used.
    """
    if seed is None:
        seed = random.SystemRandom().randint(0, _MAX_SEED)
        seed = _broadcast_seed(seed)
        log.info("No seed given; using random seed %d", seed)
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}], got {seed}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily when CUDA is not initialised)
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "manual_seed_all"):
        npu.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
    return seed


def _broadcast_seed(seed: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return seed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def rng_state() -> dict[str, Any]:
    """Capture every RNG state as plain Python lists/ints and CPU tensors.

    The result survives ``torch.save`` / ``torch.load(weights_only=True)``.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...] (if CUDA
        is initialised), "npu": [...] (if torch_npu is loaded)}``.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "get_rng_state_all") and npu.is_available():
        state["npu"] = npu.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`rng_state`.

    Accelerator states are restored when that accelerator is present; resuming a GPU checkpoint
    on a machine without the GPU logs a warning and restores the rest.

    Args:
        state: The dict returned by :func:`rng_state` (possibly after a save/load round trip).
    """
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state:
        if torch.cuda.is_available():
            saved = list(state["cuda"])
            if len(saved) != torch.cuda.device_count():
                log.warning(
                    "RNG state has %d CUDA generators, this machine %d; restoring the common ones",
                    len(saved),
                    torch.cuda.device_count(),
                )
            for i, s in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)
        else:
            log.warning("RNG state holds CUDA generators but CUDA is not available; they are not restored")
    if "npu" in state:
        npu = getattr(torch, "npu", None)
        if npu is not None and npu.is_available():
            for i, s in enumerate(list(state["npu"])[: npu.device_count()]):
                npu.set_rng_state(s.cpu(), i)
        else:
            log.warning("RNG state holds NPU generators but no NPU is available; they are not restored")


__all__ = ["DeviceError", "get_device", "get_dtype", "rng_state", "set_rng_state", "set_seed"]
