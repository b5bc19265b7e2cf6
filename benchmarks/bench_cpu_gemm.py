"""fp32 CPU GEMMs: ``torch.mm`` (MKL on x86 wheels) vs oneDNN (``cpu_gemm: onednn`` and ``onednn_fast``).

    python benchmarks/bench_cpu_gemm.py                 # SmolLM2-135M training and decode shapes
    python benchmarks/bench_cpu_gemm.py --threads 2
    python benchmarks/bench_cpu_gemm.py --smoke         # tiny shapes (checks the script)

Every row is one GEMM as a training step of SmolLM2-135M (bs 4 x 512, ~1,624 label-bearing tokens
padding-free) or a decode step issues it, with the operand layouts the code uses (``A^T``: a
transposed view, as in the weight gradient), through ``cpu_gemm.mm`` under each back end (so
with its dispatch rules: decode rows stay on ``torch.mm`` under the oneDNN back ends). The back
ends are timed interleaved (best of ``--repeats``, 2 rounds) and compared with an fp64 product (max
and mean absolute error) and with ``torch.mm``'s bits. The last row is the large square GEMM that
``bench_train.py`` takes as the machine's fp32 peak (its ``fast`` column: oneDNN in one pass).

A second table times LoRA's rank-``r`` GEMMs with a long reduction (``torch.mm``, ``r = 8``) in two
orientations: ``r`` as the product's columns (``x A^T``, ``g B``, ``g^T ax``, as the eager
composition computes them) and ``r`` as its rows, used transposed (``A x^T``, ``B^T g^T``,
``ax^T g``), and in the form ``tinytune`` runs under ``cpu_gemm: onednn_fast`` (``cpu_gemm.thin_mm``:
oneDNN in one pass), with each one's relative RMS error against fp64. ``tinytune``'s LoRA backward
uses the rows form for ``g B`` and ``g^T ax``; its forward keeps ``x A^T`` (see
``tinytune/kernels/fused_ops.py``).
"""

from __future__ import annotations

import argparse
import contextlib
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
SMOKE = [("smoke fwd", 256, 400, 96, False, True), ("smoke dW", 192, 256, 96, True, False)]  # k: 3 and 2 blocks

# LoRA layers of SmolLM2-135M, (what, d_in, d_out): rank-r GEMMs over N tokens
LORA_SHAPES = [("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576)]
LORA_SMOKE = [("smoke", 96, 64)]


def _lora_cases(n: int, d_in: int, d_out: int, r: int, g: torch.Generator) -> dict:
    """The rank-``r`` products of one LoRA layer: ``name: (fp64 reference, r as columns, r as rows,
    the form tinytune runs under onednn_fast)``."""
    x, a = torch.randn(n, d_in, generator=g), torch.randn(r, d_in, generator=g)  # x [N, in], A [r, in]
    grad, b = torch.randn(n, d_out, generator=g), torch.randn(d_out, r, generator=g)  # g [N, out], B [out, r]
    ax = torch.randn(n, r, generator=g)  # [N, r]
    thin = cpu_gemm.thin_mm
    return {
        "x A^T (fwd)": (
            x.double() @ a.double().t(),
            lambda: x.mm(a.t()),
            lambda: a.mm(x.t()).t(),
            lambda: thin(x, a.t()),
        ),
        "g B (bwd)": (
            grad.double() @ b.double(),
            lambda: grad.mm(b),
            lambda: b.t().mm(grad.t()).t(),
            lambda: thin(b.t(), grad.t()).t(),
        ),
        "g^T ax (bwd dB)": (
            grad.double().t() @ ax.double(),
            lambda: grad.t().mm(ax),
            lambda: ax.t().mm(grad).t(),
            lambda: thin(ax.t(), grad).t(),
        ),
    }


def _lora_table(shapes, n: int, r: int, repeats: int) -> None:
    """Prints the rank-``r`` GEMM table (see the module docstring)."""
    rows, g = [], torch.Generator().manual_seed(0)
    with _kept_backend():
        cpu_gemm.set_cpu_gemm("onednn_fast")  # for the fast column; the other two call torch.mm directly
        for what, d_in, d_out in shapes:
            for name, (ref, as_cols, as_rows, fast) in _lora_cases(n, d_in, d_out, r, g).items():
                t = _interleaved_best({"cols": as_cols, "rows": as_rows, "fast": fast}, repeats)
                err = [float((f().double() - ref).norm() / ref.norm()) for f in (as_cols, as_rows, fast)]
                rows.append(
                    [f"{what} {name}", f"{d_in}->{d_out}"]
                    + [f"{t[key] * 1e6:.0f}" for key in ("cols", "rows", "fast")]
                    + [f"{t['cols'] / t['rows']:.2f}x", f"{t['rows'] / t['fast']:.2f}x"]
                    + [f"{e:.2e}" for e in err]
                    + [f"{err[1] / err[0]:.2f}x", f"{err[2] / err[1]:.2f}x"]
                )
    print(
        f"LoRA rank-{r} GEMMs over N = {n} tokens (torch.mm, and onednn_fast's cpu_gemm.thin_mm; errors: "
        "relative RMS against fp64)"
    )
    print()
    print_table(
        ["product", "layer", "r as cols us", "r as rows us", "fast us", "rows/cols speed-up", "fast/rows speed-up"]
        + ["err cols", "err rows", "err fast", "err rows/cols", "err fast/rows"],
        rows,
    )


@contextlib.contextmanager
def _kept_backend():
    """The process's cpu_gemm back end is restored on exit (the tables switch it per call)."""
    saved = dict(cpu_gemm._STATE)
    try:
        yield
    finally:
        cpu_gemm._STATE.update(saved)


def _operand(rows: int, cols: int, transposed: bool, g: torch.Generator) -> torch.Tensor:
    """A ``[rows, cols]`` fp32 operand, stored transposed (a ``.t()`` view) when ``transposed``."""
    return torch.randn(cols, rows, generator=g).t() if transposed else torch.randn(rows, cols, generator=g)


BACKENDS = ("torch", "onednn", "onednn_fast")


def _gemm(backend: str, a: torch.Tensor, b: torch.Tensor):
    """``a @ b`` as ``cpu_gemm: backend`` dispatches it (sizes and rows thresholds included); the CE
    rows as the fused CE runs them (each call copies the weight's k-blocks it needs)."""
    cpu_gemm.set_cpu_gemm(backend)
    return cpu_gemm.mm(a, b)


def _interleaved_best(fns: dict, repeats: int) -> dict:
    """Seconds of each function's fastest call: one warm-up call each (thread pool, primitive
    creation), then two rounds of ``repeats`` calls, the functions interleaved."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(2):
        for name, fn in fns.items():
            times[name].append(best_time(fn, repeats))
    return {name: min(ts) for name, ts in times.items()}


def _case(what: str, m: int, k: int, n: int, ta: bool, tb: bool, repeats: int) -> dict:
    g = torch.Generator().manual_seed(m + k + n)
    a, b = _operand(m, k, ta, g), _operand(k, n, tb, g)
    ref = a.double() @ b.double()
    fns = {name: (lambda name=name: _gemm(name, a, b)) for name in BACKENDS}
    if what.startswith("square"):  # the peak: oneDNN in one pass, whatever the back end's rules
        fns["onednn_fast"] = lambda: cpu_gemm.one_pass(a, b.t())
    times = _interleaved_best(fns, repeats)
    out, base = {}, fns["torch"]()
    flop = 2 * m * k * n
    for name, fn in fns.items():
        got = fn()
        e = (got.double() - ref).abs()
        out[name] = (flop / times[name] / 1e9, times[name] * 1e3, float(e.max()), float(e.mean()))
        out[name + " equal"] = bool(torch.equal(got, base))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    p.add_argument("--lora-rank", type=int, default=8, help="r of the LoRA rank-r GEMM table")
    args = p.parse_args(argv)
    if not cpu_gemm.onednn_available():
        print("this PyTorch build has no usable oneDNN matmul: nothing to compare", file=sys.stderr)
        return 1
    shapes = SMOKE if args.smoke else SHAPES
    repeats = 1 if args.smoke else args.repeats
    torch.set_num_threads(args.threads)
    print(f"# bench_cpu_gemm: {machine_line()}; CPU vendor {cpu_gemm.cpu_vendor() or 'n/a'}")
    print(
        f"# fp32, threads {args.threads}; best of {repeats} x 2 rounds interleaved; errors: max / mean |x - fp64|; "
        "bits: product bitwise equal to torch's"
    )
    print()
    rows, step_ms = [], dict.fromkeys(BACKENDS, 0.0)
    with _kept_backend():
        for what, m, k, n, ta, tb in shapes:
            r = _case(what, m, k, n, ta, tb, repeats)
            if not what.startswith(("square", "decode")):
                for name in BACKENDS:
                    step_ms[name] += r[name][1]
            gt = r["torch"][0]
            rows.append(
                [what, f"{m}x{k}x{n}" + (" (A^T)" if ta else "")]
                + [f"{r[name][0]:.1f}" for name in BACKENDS]
                + [f"{r[name][0] / gt:.2f}x" for name in BACKENDS[1:]]
                + [f"{r[name][2]:.1e} / {r[name][3]:.1e}" for name in BACKENDS]
                + ["/".join("yes" if r[name + " equal"] else "no" for name in BACKENDS[1:])]
            )
    print_table(
        ["GEMM", "m x k x n", "torch GFLOP/s", "onednn GFLOP/s", "fast GFLOP/s", "onednn/torch", "fast/torch"]
        + ["err torch", "err onednn", "err fast", "bits onednn/fast"],
        rows,
    )
    t = step_ms["torch"]
    print(
        "training-step rows, one of each: "
        + ", ".join(f"{name} {ms:.1f} ms ({t / max(ms, 1e-9):.2f}x)" for name, ms in step_ms.items())
    )
    print()
    _lora_table(LORA_SMOKE if args.smoke else LORA_SHAPES, 64 if args.smoke else 2048, args.lora_rank, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
