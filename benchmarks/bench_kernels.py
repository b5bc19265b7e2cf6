"""Kernel benchmarks: flash attention and fused linear cross-entropy.

    python benchmarks/bench_kernels.py            # CUDA: CE time/memory + attention TFLOP/s; CPU: CE memory
    python benchmarks/bench_kernels.py --part ce  # CUDA: only the fused CE (or --part attention)
    python benchmarks/bench_kernels.py --cpu      # force the CPU part (chunked CE vs plain linear+CE)
    python benchmarks/bench_kernels.py --part chunks  # CPU: the fused CE's time and scratch per chunk size

GPU part (needs CUDA):
* attention fwd and fwd+bwd TFLOP/s, causal, bf16, vs ``F.scaled_dot_product_attention`` pinned to
  the flash backend; packed documents vs ``flex_attention`` with a document mask. FLOPs:
  ``4 * B * H * N^2 * D`` (half for causal), backward counted as 2.5x forward.
* fused linear+CE (``tinytune.kernels.linear_cross_entropy``) vs ``torch.compile``-d
  ``F.cross_entropy(F.linear(h, W).float())``: time of forward+backward and peak memory above the inputs.

CPU part: peak resident memory (RSS high-water mark, each case in a fresh subprocess) and time of the
chunked PyTorch CE vs ``F.cross_entropy(F.linear(h, W))``, forward+backward.

``--part chunks`` (CPU): forward+backward of ``linear_cross_entropy`` at a training step's shape
(SmolLM2-135M: 1,624 tokens of which 448 labelled, d 576, V 49,152) for several chunk sizes, fp32
and bf16, with and without the weight gradient (full fine-tuning / LoRA), the sizes interleaved;
best of ``--reps`` rounds, time relative to the largest chunk, and the ``[chunk, V]`` scratch kept
between calls (what the chunk size adds to the step's memory peak).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------- CPU


def _cpu_case(kind: str, n: int, d: int, v: int, dtype: str) -> dict:
    """Runs in a fresh process: RSS peak delta (MiB) and time (s) of one forward+backward."""
    from tinytune.kernels import linear_cross_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(n, d, dtype=dt).requires_grad_()
    w = (torch.randn(v, d, dtype=dt) / math.sqrt(d)).requires_grad_()
    y = torch.randint(0, v, (n,))

    def step():
        if kind == "chunked":
            loss = linear_cross_entropy(h, w, y, reduction="mean")
        else:
            loss = F.cross_entropy(F.linear(h, w).float(), y, reduction="mean")
        loss.backward()
        return loss

    # warm up on a tiny slice (imports, thread pools) so the high-water mark measures the real step
    F.cross_entropy(F.linear(h[:8], w[:64]).float(), y[:8] % 64).item()
    h.grad = w.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    t0 = time.perf_counter()
    loss = step()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak - before, "time_s": elapsed, "loss": float(loss)}


def run_cpu(cases) -> list[dict]:
    rows = []
    for n, d, v, dtype in cases:
        res = {}
        for kind in ("unfused", "chunked"):
            out = subprocess.run(
                [sys.executable, __file__, "--_case", json.dumps([kind, n, d, v, dtype])],
                capture_output=True,
                text=True,
                check=True,
            )
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        assert abs(res["chunked"]["loss"] - res["unfused"]["loss"]) < 1e-3 * max(1.0, abs(res["unfused"]["loss"]))
        logits_mib = n * v * 4 / 2**20
        rows.append(
            dict(
                n=n,
                d=d,
                v=v,
                dtype=dtype,
                logits_mib=logits_mib,
                **{f"{k}_{m}": res[k][m] for k in res for m in ("peak_mib", "time_s")},
            )
        )
    print(
        f"\n{'tokens':>6} {'dim':>5} {'vocab':>7} {'dtype':>8} {'fp32 logits':>11} | "
        f"{'plain peak':>10} {'chunked peak':>12} {'ratio':>6} | {'plain s':>7} {'chunked s':>9} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['n']:>6} {r['d']:>5} {r['v']:>7} {r['dtype']:>8} {r['logits_mib']:>8.0f}MiB | "
            f"{r['unfused_peak_mib']:>7.0f}MiB {r['chunked_peak_mib']:>9.0f}MiB "
            f"{r['chunked_peak_mib'] / r['unfused_peak_mib']:>6.3f} | {r['unfused_time_s']:>7.2f} "
            f"{r['chunked_time_s']:>9.2f} {r['chunked_time_s'] / r['unfused_time_s']:>6.2f}"
        )
    return rows


def bench_ce_chunks(rows_list: list[int], n: int, labelled: int, d: int, v: int, reps: int) -> list[list[str]]:
    """CPU: the fused CE's forward+backward time per chunk size (see the module docstring)."""
    from tinytune.kernels import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    labels = torch.full((n,), -100)
    keep = torch.randperm(n, generator=g)[:labelled]
    labels[keep] = torch.randint(0, v, (labelled,), generator=g)
    table = []
    for dtype, need_w in (
        (torch.float32, True),
        (torch.float32, False),
        (torch.bfloat16, True),
        (torch.bfloat16, False),
    ):
        h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype).requires_grad_(need_w)
        best = {c: math.inf for c in rows_list}
        losses = {}
        for _ in range(reps):
            for c in rows_list:  # interleaved: the machine's drift hits every size alike
                h.grad = w.grad = None
                t0 = time.perf_counter()
                loss = linear_cross_entropy(h, w, labels, chunk_size=c)
                loss.backward()
                best[c] = min(best[c], time.perf_counter() - t0)
                losses[c] = float(loss.detach())
        ref = rows_list[0]
        for c in rows_list:
            assert abs(losses[c] - losses[ref]) <= 1e-4 * abs(losses[ref]), (c, losses)
            rows_used = min(c, labelled)  # the CE runs on the labelled rows only
            scratch = rows_used * v * (4 + (dtype.itemsize if dtype != torch.float32 else 0)) / 2**20
            table.append(
                [
                    f"{str(dtype).removeprefix('torch.')} {'full' if need_w else 'LoRA'}",
                    str(c),
                    f"{1000 * best[c]:.1f}",
                    f"{best[c] / best[ref]:.2f}x",
                    f"{scratch:.1f}",
                ]
            )
    head = ["dtype, weight grad", "chunk rows", "fwd+bwd ms", "time / first", "scratch MiB"]
    print(
        f"\nfused CE per chunk size: {n} tokens, {labelled} labelled, d {d}, V {v}, best of {reps}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for r in table:
        print("| " + " | ".join(r) + " |")
    return table


# ------------------------------------------------------------------------------------------- GPU


def _bench(fn, reps=20):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=reps * 10) / 1e3  # seconds


def bench_attention_gpu():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinytune.kernels import flash_attention

    dev, dt = "cuda", torch.bfloat16
    print(f"\nattention, causal, bf16 ({torch.cuda.get_device_name()}); TFLOP/s (4*B*H*N^2*D/2, bwd = 2.5x fwd)")
    print(
        f"{'B':>3} {'H':>3} {'Hkv':>3} {'N':>6} {'D':>4} | {'ours fwd':>8} {'sdpa fwd':>8} | "
        f"{'ours f+b':>8} {'sdpa f+b':>8} {'ratio':>6}"
    )
    for b, h, hkv, n, d in [(8, 16, 16, 2048, 64), (4, 32, 8, 4096, 128), (1, 32, 8, 16384, 128)]:
        q = torch.randn(b, h, n, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
        do = torch.randn_like(q)
        flops = 4 * b * h * n * n * d / 2

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != hkv)

        def ours():
            return flash_attention(q, k, v, causal=True)

        res = {}
        for name, fn in (("ours", ours), ("sdpa", sdpa)):
            with torch.no_grad():
                t_f = _bench(fn)
            t_fb = _bench(lambda: fn().backward(do))
            res[name] = (flops / t_f / 1e12, 3.5 * flops / t_fb / 1e12)
        print(
            f"{b:>3} {h:>3} {hkv:>3} {n:>6} {d:>4} | {res['ours'][0]:>8.1f} {res['sdpa'][0]:>8.1f} | "
            f"{res['ours'][1]:>8.1f} {res['sdpa'][1]:>8.1f} {res['ours'][1] / res['sdpa'][1]:>6.2f}"
        )

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("flex_attention not available; skipping the packed-document comparison")
        return
    flex = torch.compile(flex_attention)
    print("\npacked documents (causal within each doc), bf16: fwd+bwd ms, ours vs flex_attention")
    for b, h, hkv, n, d, doc in [(4, 32, 8, 8192, 128, 1024), (1, 32, 8, 32768, 128, 2048)]:
        q = torch.randn(b, h, n, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
        do = torch.randn_like(q)
        g = torch.Generator().manual_seed(0)
        lens = []
        while sum(lens) < n:
            lens.append(min(int(torch.randint(doc // 4, 2 * doc, (1,), generator=g)), n - sum(lens)))
        seq_lens = torch.tensor([lens] * b, device=dev)
        doc_id = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))

        def mask_mod(bi, hi, qi, ki):
            return (doc_id[qi] == doc_id[ki]) & (ki <= qi)

        bm = create_block_mask(mask_mod, None, None, n, n, device=dev)
        t_ours = _bench(lambda: flash_attention(q, k, v, seq_lens=seq_lens).backward(do))
        t_flex = _bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=h != hkv).backward(do))
        print(
            f"B={b} H={h}/{hkv} N={n} D={d} docs={len(lens)}: ours {t_ours * 1e3:.2f} ms, "
            f"flex {t_flex * 1e3:.2f} ms, ratio {t_flex / t_ours:.2f}x"
        )


def bench_ce_gpu():
    from tinytune.kernels import linear_cross_entropy

    dev, dt, d = "cuda", torch.bfloat16, 4096

    @torch.compile
    def compiled(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, reduction="mean")

    print(f"\nlinear + cross-entropy, bf16, d={d}: fwd+bwd time and peak memory above inputs")
    print(
        f"{'tokens':>6} {'vocab':>7} | {'fused ms':>8} {'compiled ms':>11} {'ratio':>6} | "
        f"{'fused MiB':>9} {'compiled MiB':>12} {'ratio':>6}"
    )
    for n, v in [(8192, 128256), (16384, 128256), (8192, 151936), (32768, 151936)]:
        h = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(v, d, device=dev, dtype=dt) / math.sqrt(d)).requires_grad_()
        y = torch.randint(0, v, (n,), device=dev)
        res = {}
        for name, fn in (
            ("fused", lambda: linear_cross_entropy(h, w, y, reduction="mean")),
            ("compiled", lambda: compiled(h, w, y)),
        ):
            fn().backward()  # compile / autotune
            h.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn().backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            h.grad = w.grad = None

            def step():
                fn().backward()
                h.grad = w.grad = None

            res[name] = (_bench(step), peak)
        print(
            f"{n:>6} {v:>7} | {res['fused'][0] * 1e3:>8.1f} {res['compiled'][0] * 1e3:>11.1f} "
            f"{res['fused'][0] / res['compiled'][0]:>6.2f} | {res['fused'][1]:>9.0f} {res['compiled'][1]:>12.0f} "
            f"{res['fused'][1] / res['compiled'][1]:>6.3f}"
        )


CPU_CASES = [(2048, 576, 49152, "float32"), (4096, 576, 49152, "float32"), (1024, 576, 151936, "float32")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the CPU part even when CUDA is available")
    p.add_argument(
        "--part",
        choices=["all", "attention", "ce", "chunks"],
        default="all",
        help="GPU: which benchmark to run; chunks: the CPU CE per chunk size",
    )
    p.add_argument("--reps", type=int, default=3, help="--part chunks: rounds (best of)")
    p.add_argument("--smoke", action="store_true", help="--part chunks: a tiny shape (checks the script)")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._case:
        print(json.dumps(_cpu_case(*json.loads(args._case))))
        return
    if args.part == "chunks":
        if args.smoke:
            bench_ce_chunks([64, 32, 16], n=96, labelled=48, d=32, v=500, reps=1)
        else:
            bench_ce_chunks([448, 320, 256, 192, 128], n=1624, labelled=448, d=576, v=49152, reps=args.reps)
        return
    if torch.cuda.is_available() and not args.cpu:
        if args.part in ("all", "ce"):
            bench_ce_gpu()
        if args.part in ("all", "attention"):
            bench_attention_gpu()
    else:
        print(
            f"CPU: chunked PyTorch linear_cross_entropy vs F.cross_entropy(F.linear(h, W)), fwd+bwd, "
            f"{torch.get_num_threads()} threads; peak = RSS high-water-mark delta in a fresh process"
        )
        run_cpu(CPU_CASES)


if __name__ == "__main__":
    main()
