"""fp32 CPU GEMMs: PyTorch's default (``torch.mm``, MKL on x86 wheels) vs oneDNN (``cpu_gemm: onednn``).

    python benchmarks/bench_cpu_gemm.py                 # SmolLM2-135M training and decode shapes
    python benchmarks/bench_cpu_gemm.py --threads 2
    python benchmarks/bench_cpu_gemm.py --smoke         # tiny shapes (checks the script)

Every row is one GEMM as a training step of SmolLM2-135M (bs 4 x 512, ~1,624 label-bearing tokens
padding-free) or a decode step issues it, with the operand layouts the code uses (``A^T``: a
transposed view, as in the weight gradient). Both back ends are timed interleaved (best of
``--repeats``, 2 rounds) and compared with an fp64 product: max and mean absolute error. The last
row is the large square GEMM that ``bench_train.py`` takes as the machine's fp32 peak.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import best_time, machine_line, print_table  # noqa: E402

from tinytune.kernels import cpu_gemm  # noqa: E402

# (what, m, k, n, a transposed, b transposed): a [m, k] @ b [k, n]
SHAPES = [
    ("q/o proj fwd  x W^T", 1624, 576, 576, False, True),
    ("q/o proj dX   g W", 1624, 576, 576, False, False),
    ("q/o proj dW   g^T x", 576, 1624, 576, True, False),
    ("k/v proj fwd", 1624, 576, 192, False, True),
    ("gate/up fwd", 1624, 576, 1536, False, True),
    ("gate/up dX", 1624, 1536, 576, False, False),
    ("gate/up dW", 1536, 1624, 576, True, False),
    ("down fwd", 1624, 1536, 576, False, True),
    ("down dW", 576, 1624, 1536, True, False),
    ("CE logits     h W^T", 448, 576, 49152, False, True),
    ("CE grad_h     g W", 448, 49152, 576, False, False),
    ("CE grad_W     g^T h", 49152, 448, 576, True, False),
    ("decode gate/up, batch 8", 8, 576, 1536, False, True),
    ("decode output, batch 1", 1, 576, 49152, False, True),
    ("square (bench_train peak)", 2048, 2048, 2048, False, False),
]
SMOKE = [("smoke fwd", 64, 48, 96, False, True), ("smoke dW", 48, 64, 96, True, False)]


def _operand(rows: int, cols: int, transposed: bool, g: torch.Generator) -> torch.Tensor:
    """A ``[rows, cols]`` fp32 operand, stored transposed (a ``.t()`` view) when ``transposed``."""
    return torch.randn(cols, rows, generator=g).t() if transposed else torch.randn(rows, cols, generator=g)


def _case(m: int, k: int, n: int, ta: bool, tb: bool, repeats: int) -> dict:
    g = torch.Generator().manual_seed(m + k + n)
    a, b = _operand(m, k, ta, g), _operand(k, n, tb, g)
    ref = a.double() @ b.double()
    torch_mm = lambda: torch.mm(a, b)  # noqa: E731
    dnn_mm = lambda: cpu_gemm._lp(a, b.t())  # noqa: E731  (oneDNN, whatever cpu_gemm's size threshold)
    times = {"torch": [], "onednn": []}
    for fn in (torch_mm, dnn_mm):
        fn()  # warm-up: thread pool, primitive creation
    for _ in range(2):
        times["torch"].append(best_time(torch_mm, repeats))
        times["onednn"].append(best_time(dnn_mm, repeats))
    errs = {}
    for name, fn in (("torch", torch_mm), ("onednn", dnn_mm)):
        e = (fn().double() - ref).abs()
        errs[name] = (float(e.max()), float(e.mean()))
    flop = 2 * m * k * n
    return {name: (flop / min(t) / 1e9, min(t) * 1e3, *errs[name]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    args = p.parse_args(argv)
    if not cpu_gemm.onednn_available():
        print("this PyTorch build has no usable oneDNN matmul: nothing to compare", file=sys.stderr)
        return 1
    shapes = SMOKE if args.smoke else SHAPES
    repeats = 1 if args.smoke else args.repeats
    torch.set_num_threads(args.threads)
    print(f"# bench_cpu_gemm: {machine_line()}; CPU vendor {cpu_gemm.cpu_vendor() or 'n/a'}")
    print(f"# fp32, threads {args.threads}; best of {repeats} x 2 rounds interleaved; errors: max / mean |x - fp64|")
    print()
    rows, ms_t, ms_d = [], 0.0, 0.0
    for what, m, k, n, ta, tb in shapes:
        r = _case(m, k, n, ta, tb, repeats)
        (gt, mt, xt, at), (gd, md, xd, ad) = r["torch"], r["onednn"]
        if not what.startswith(("square", "decode")):
            ms_t, ms_d = ms_t + mt, ms_d + md
        rows.append(
            [
                what,
                f"{m}x{k}x{n}" + (" (A^T)" if ta else ""),
                f"{gt:.1f}",
                f"{gd:.1f}",
                f"{gd / gt:.2f}x",
                f"{xt:.1e} / {at:.1e}",
                f"{xd:.1e} / {ad:.1e}",
            ]
        )
    print_table(
        ["GEMM", "m x k x n", "torch GFLOP/s", "oneDNN GFLOP/s", "oneDNN/torch", "err torch", "err oneDNN"], rows
    )
    print(f"training-step rows, one of each: torch {ms_t:.1f} ms, oneDNN {ms_d:.1f} ms, {ms_t / max(ms_d, 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
