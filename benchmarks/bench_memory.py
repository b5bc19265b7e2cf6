"""Peak memory of the output layer's loss + backward: chunked fused CE vs plain logits.

For each vocabulary (49,152: SmolLM2, d=576; 151,936: Qwen2.5, d=896) and ``bs x seq`` tokens
(default 1 x 2048), one forward + backward of the output projection and cross-entropy, each in a
fresh process:

* ``tinytune``: ``tinytune.kernels.linear_cross_entropy`` (chunked, never holds ``[N, V]`` logits).
* ``plain``: ``F.cross_entropy(F.linear(h, W).float(), y)``: what HF transformers' causal-LM loss
  does (full logits, fp32 upcast).
* ``torchtune``: torchtune's ``CEWithChunkedOutputLoss`` on the 8 output chunks its models return
  (all chunks of logits are materialised, the fp32 upcast happens per chunk); runs in the
  torchtune venv when it exists.

Reported: peak growth over the inputs (RSS high-water mark minus RSS before the step on CPU;
``torch.cuda.max_memory_allocated`` minus allocated-before on GPU), time, and loss (all sides
must agree).

    python benchmarks/bench_memory.py                 # seq 2048, both vocabularies, fp32
    python benchmarks/bench_memory.py --bs 4 --dtype bf16
    python benchmarks/bench_memory.py --smoke         # tiny sizes (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import current_rss_mib, emit_result, fmt, machine_line, peak_rss_mib, print_table, run_worker  # noqa: E402

VOCABS = {49152: 576, 151936: 896}  # vocab -> hidden size of the model that uses it
DEFAULT_TORCHTUNE_PYTHON = "/work/bench-venv/bin/python"


def worker_main(spec: dict) -> None:
    """One loss + backward in this (fresh) process; reports peak growth and time."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    device = torch.device(spec["device"])
    n, d, v = spec["tokens"], spec["dim"], spec["vocab"]
    h = torch.randn(n, d, dtype=dtype, device=device).requires_grad_()  # [N, d]
    w = (torch.randn(v, d, device=device) / math.sqrt(d)).to(dtype).requires_grad_()  # [V, d]
    y = torch.randint(0, v, (n,), device=device)
    y[::7] = -100  # some masked positions

    if spec["method"] == "tinytune":
        from tinytune.kernels import linear_cross_entropy

        def loss_fn(h_, w_, y_):
            return linear_cross_entropy(h_, w_, y_, reduction="mean")
    elif spec["method"] == "plain":

        def loss_fn(h_, w_, y_):
            return F.cross_entropy(F.linear(h_, w_).float(), y_, ignore_index=-100)
    else:
        import importlib

        try:  # torchtune 0.6.1 imports NF4 from torchao's old path
            import torchao.dtypes.nf4tensor  # noqa: F401
        except ImportError:
            sys.modules["torchao.dtypes.nf4tensor"] = importlib.import_module(
                "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
            )
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        ce = CEWithChunkedOutputLoss()

        def loss_fn(h_, w_, y_):  # torchtune's TransformerDecoder returns per-chunk logits
            chunks = [F.linear(c, w_) for c in h_[None].chunk(ce.num_output_chunks, dim=1)]
            return ce(chunks, y_[None])

    # warm up on a slice so one-time allocations (thread pools, kernels) are not counted
    loss_fn(h[:16], w[:256], torch.where(y[:16] >= 0, y[:16] % 256, y[:16])).backward()
    h.grad = w.grad = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    loss = loss_fn(h, w, y)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = peak_rss_mib() - rss_before
    emit_result(
        {
            "peak_mib": peak,
            "time_s": elapsed,
            "loss": float(loss),
            "grad_ok": bool(h.grad is not None and w.grad is not None),
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--vocabs", default="49152,151936", help="comma-separated; dims: 49152->576, 151936->896")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per case (median reported)")
    p.add_argument("--methods", default="tinytune,plain,torchtune")
    p.add_argument("--torchtune-python", default=DEFAULT_TORCHTUNE_PYTHON)
    p.add_argument("--smoke", action="store_true", help="seq 128, vocab 4096 (dim 64)")
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0

    vocabs = {4096: 64} if args.smoke else {int(v): VOCABS.get(int(v), 896) for v in args.vocabs.split(",")}
    seq = 128 if args.smoke else args.seq
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    notes = []
    pythons = {m: sys.executable for m in methods}
    if "torchtune" in methods:
        if os.path.exists(args.torchtune_python):
            pythons["torchtune"] = args.torchtune_python
        else:
            methods.remove("torchtune")
            notes.append(f"torchtune skipped: {args.torchtune_python} not found")
    print(f"# bench_memory: {machine_line()}")
    print(f"# output layer loss + backward, {args.bs} x {seq} tokens, {args.dtype} on {args.device}", flush=True)
    rows = []
    script = os.path.abspath(__file__)
    failed = False
    for vocab, dim in vocabs.items():
        res = {}
        for m in methods:
            spec = dict(method=m, tokens=args.bs * seq, dim=dim, vocab=vocab, dtype=args.dtype, device=args.device)
            runs = [run_worker(pythons[m], script, spec, timeout=1800) for _ in range(args.rounds)]
            ok = [r for r in runs if "error" not in r]
            if not ok:
                notes.append(f"{m} vocab {vocab}: {runs[0]['error']}")
                failed = True
                continue
            ok.sort(key=lambda r: r["peak_mib"])
            res[m] = ok[len(ok) // 2]
        logits_mib = args.bs * seq * vocab * 4 / 2**20
        for m, r in res.items():
            ratio = "-"
            if m != "tinytune" and "tinytune" in res and r["peak_mib"] > 0:
                ratio = f"{res['tinytune']['peak_mib'] / r['peak_mib']:.2f}x"
            rows.append(
                [
                    f"{vocab} (d={dim})",
                    m,
                    fmt(r["peak_mib"], ".0f"),
                    ratio,
                    fmt(r["time_s"], ".3f"),
                    fmt(r["loss"], ".4f"),
                    fmt(logits_mib, ".0f"),
                ]
            )
    print()
    print_table(["vocab", "method", "peak MiB", "ours/theirs", "time s", "loss", "fp32 logits MiB"], rows)
    for n in notes:
        print(f"note: {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
