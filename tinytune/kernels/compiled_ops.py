"""``compile: true``: the fused elementwise ops' bodies compiled with ``torch.compile``.

:mod:`tinytune.kernels.fused_ops` writes RMSNorm, SwiGLU and RoPE (forward and backward) as short
sequences of PyTorch ops; in eager mode every op is one pass over memory. Compiled (inductor: C++
loops on CPU, Triton on CUDA) each body becomes one or two fused loops. The autograd Functions,
what they save for backward and the models are unchanged: only the bodies they call are swapped.

Measured on the 2-core AVX-512 CPU, one thread, SmolLM2-135M shapes (1,624 x 1,536 SwiGLU,
1,624 x 576 RMSNorm; ``benchmarks/RESULTS.md``): SwiGLU backward 4.6 -> 2.0 ms, RMSNorm forward
1.4 -> 0.4 ms in bf16. Compiling costs seconds per body and dtype on the first call of a process
(inductor caches the code on disk, so later processes start faster).

Off by default: the switch is process-wide (:func:`set_compiled`), set by the recipes from
``hardware.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_STATE: dict[str, Any] = {"on": False, "compiled": {}}


def set_compiled(on: bool) -> None:
    """Turn the compiled bodies on or off for this process.

    Turning them on compiles and runs a small RMSNorm first, so a missing compiler toolchain
    fails here, with the reason, rather than in the first training step.

    Raises:
        RuntimeError: ``torch.compile`` does not work here (e.g. no C++ compiler for inductor on CPU).
    """
    if on and not _STATE["on"]:
        try:
            x = torch.linspace(-2.0, 3.0, 16).view(2, 8)  # no RNG draw: the run's seeded streams stay as they are
            torch.testing.assert_close(_compile(_probe)(x), _probe(x))
        except Exception as e:  # noqa: BLE001 - any failure means compile cannot be used here; re-raised
            raise RuntimeError(
                f"compile: true needs a working torch.compile (inductor; on CPU a C++ compiler such as g++): "
                f"{type(e).__name__}: {e}"
            ) from e
    _STATE["on"] = bool(on)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # an RMSNorm: reduction + pointwise


def is_compiled() -> bool:
    """Whether the compiled bodies are on."""
    return _STATE["on"]


RECOMPILE_LIMIT = 32  # per body: dtypes x ranks x flag values x size-1 dims of a run stay well below it


def _compile(fn: Callable) -> Callable:
    cache = _STATE["compiled"]
    if fn not in cache:
        # dynamic: one compile per body, dtype, rank and flag values, not per sequence length. At the
        # recompile limit dynamo runs the body eagerly (same operations) instead of compiling again.
        body = torch.compile(fn, dynamic=True)

        def call(*args: Any) -> Any:
            # detached: no recompiles on requires_grad, and a view's base is not guarded on
            return body(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

        call.__name__ = fn.__name__
        cache[fn] = call
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    return cache[fn]


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled when :func:`set_compiled` is on, else ``fn`` itself."""
    return _compile(fn) if _STATE["on"] else fn
