"""CPU per-document causal attention: the blocked-GEMM kernel vs PyTorch's fused CPU kernel.

    python benchmarks/bench_cpu_attention.py                  # SmolLM2-135M shapes, fp32 and bf16
    python benchmarks/bench_cpu_attention.py --lengths 314,406,497 --heads 9 --kv-heads 3 --head-dim 64
    python benchmarks/bench_cpu_attention.py --smoke          # tiny shapes (checks the script)

One document per call (what ``tinytune.modules.document_attention`` does per packed document),
forward and backward timed separately (best of ``--repeats``, the two kernels interleaved), and the
largest error of the output and of dQ / dK / dV against an fp64 reference, for both kernels. The
ratio column is fused time / GEMM time (> 1: the GEMM path is faster).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import best_time, machine_line  # noqa: E402

from tinytune.kernels import cpu_attention  # noqa: E402

_aten = torch.ops.aten


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    return best_time(fn, repeats)


def _case(n: int, h: int, h_kv: int, d: int, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, n, h, d, generator=g).to(dtype).transpose(1, 2)  # [1, h, n, d] token-major, as in the model
    k = torch.randn(1, h_kv, n, d, generator=g).to(dtype)
    v = torch.randn(1, h_kv, n, d, generator=g).to(dtype)
    do = torch.randn(1, n, h, d, generator=g).to(dtype).transpose(1, 2)
    scale = 1 / math.sqrt(d)

    def fused_fwd():
        return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)

    o_ref, lse_ref = fused_fwd()

    def fused_bwd():
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o_ref, lse_ref, 0.0, True, scale=scale
        )

    out = torch.empty(1, n, h, d, dtype=dtype).transpose(1, 2)
    lse = torch.empty(1, h, n, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def gemm_fwd():
        cpu_attention.gemm_attention_forward(q[0], k[0], v[0], scale, out[0], lse[0])

    def gemm_bwd():
        cpu_attention.gemm_attention_backward(do[0], q[0], k[0], v[0], out[0], lse[0], scale, dq[0], dk[0], dv[0])

    gemm_fwd()
    gemm_bwd()
    fused_grads = fused_bwd()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64 = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=h != h_kv)
    ref_grads = torch.autograd.grad(o64, (q64, k64, v64), do.double())

    def err(a, b):
        return (a.double() - b).abs().max().item()

    times = {"fused_fwd": [], "gemm_fwd": [], "fused_bwd": [], "gemm_bwd": []}
    for _ in range(2):  # interleaved
        times["fused_fwd"].append(_best(fused_fwd, repeats))
        times["gemm_fwd"].append(_best(gemm_fwd, repeats))
        times["fused_bwd"].append(_best(fused_bwd, repeats))
        times["gemm_bwd"].append(_best(gemm_bwd, repeats))
    best = {key: min(val) * 1e3 for key, val in times.items()}
    refs = (o64, *ref_grads)
    return {
        **best,
        "err_fused": [err(a, b) for a, b in zip((o_ref, *fused_grads), refs)],
        "err_gemm": [err(a, b) for a, b in zip((out, dq, dk, dv), refs)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="314,406,497", help="document lengths (comma-separated)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.kv_heads, args.head_dim, args.repeats = "5,40", 4, 2, 16, 1
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"# bench_cpu_attention: {machine_line()}")
    print(
        f"# heads {args.heads} / kv {args.kv_heads}, head dim {args.head_dim}, threads {args.threads}, "
        f"GEMM block {cpu_attention.BLOCK}; ms, best of {args.repeats} x 2 interleaved; errors: max |x - fp64| "
        "of out / dq / dk / dv"
    )
    print()
    print(
        "| dtype | tokens | fused fwd | GEMM fwd | fused bwd | GEMM bwd | fwd+bwd fused/GEMM | errors fused | errors GEMM |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    totals: dict[str, list[float]] = {}
    for name in args.dtypes.split(","):
        for n in (int(x) for x in args.lengths.split(",")):
            r = _case(n, args.heads, args.kv_heads, args.head_dim, dtypes[name], args.repeats)
            fused, gemm = r["fused_fwd"] + r["fused_bwd"], r["gemm_fwd"] + r["gemm_bwd"]
            t = totals.setdefault(name, [0.0, 0.0])
            t[0], t[1] = t[0] + fused, t[1] + gemm
            errs = [" / ".join(f"{e:.1e}" for e in r[key]) for key in ("err_fused", "err_gemm")]
            print(
                f"| {name} | {n} | {r['fused_fwd']:.2f} | {r['gemm_fwd']:.2f} | {r['fused_bwd']:.2f} | "
                f"{r['gemm_bwd']:.2f} | {fused / gemm:.2f}x | {errs[0]} | {errs[1]} |"
            )
    for name, (fused, gemm) in totals.items():
        print(
            f"{name}: all documents, forward + backward: fused {fused:.1f} ms, GEMM {gemm:.1f} ms, {fused / gemm:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
