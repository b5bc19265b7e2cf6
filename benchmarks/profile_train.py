"""Profile one warm training step (torch.profiler) with the same setup as ``bench_train.py``.

    python benchmarks/profile_train.py --framework tinytune --mode full --packed --device cuda --dtype bf16
    python benchmarks/profile_train.py --framework hf --mode lora --threads 1     # CPU, one thread

Prints the op table sorted by self CPU time (and by self device time on CUDA), the number of ops
launched per step and the step time. Use it where ``bench_train.py`` shows a gap to a peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as bt  # noqa: E402
from _common import make_batch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=["tinytune", "hf", "torchtune"], default="tinytune")
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--packed", action="store_true")
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", choices=["fp32", "bf16", "bf16_mixed"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default="random", help="bundled | random | PATH (HF checkpoint dir)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank, as bench_train's default)")
    p.add_argument("--rows", type=int, default=25, help="rows of each op table")
    p.add_argument("--smoke", action="store_true", help="tiny model, bs 2 x 64 (checks the script)")
    p.add_argument("--shapes", action="store_true", help="also a table grouped by op and input shapes")
    p.add_argument("--compile", action="store_true", help="tinytune with compile: true (compiled elementwise bodies)")
    p.add_argument(
        "--malloc",
        choices=["auto", "keep", "release", "default"],
        default=None,
        help="host allocator policy (default: keep for tinytune, as its recipes do here; glibc's default for peers)",
    )
    p.add_argument(
        "--cpu-gemm",
        choices=["auto", "torch", "onednn", "onednn_fast"],
        default="auto",
        help="tinytune's fp32 CPU GEMM back end (the recipes' cpu_gemm; default auto, as in the recipes)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.bs, args.seq, args.weights = 2, 64, "random"

    from tinytune.training.host_malloc import apply_malloc_policy

    apply_malloc_policy(args.malloc or ("keep" if args.framework == "tinytune" else "default"))
    import torch
    from torch.profiler import ProfilerActivity, profile

    weights, what = bt.prepare_weights(argparse.Namespace(weights=args.weights, smoke=args.smoke))
    with open(os.path.join(weights, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    spec = dict(
        bs=args.bs,
        seq=args.seq,
        vocab=vocab,
        dtype=args.dtype,
        device=args.device,
        weights=weights,
        steps=1,
        warmup=1,
        rank=args.rank,
        alpha=2.0 * args.rank,
        threads=args.threads,
        framework=args.framework,
        mode=args.mode,
        packed=args.packed,
        compile=args.compile,
        cpu_gemm=args.cpu_gemm,
        optim={"lr": 2e-4, "weight_decay": 0.01, "fused": True},
    )
    if args.framework == "tinytune":
        from tinytune.kernels.cpu_gemm import set_cpu_gemm

        print(f"# tinytune cpu_gemm: {set_cpu_gemm(args.cpu_gemm)}")
    torch_, dtype, device = bt._torch_setup(spec)
    build = {"tinytune": bt._build_tinytune, "hf": bt._build_hf, "torchtune": bt._build_torchtune}[args.framework]
    _, make_step = build(spec, torch_, dtype, device)
    step = make_step(make_batch(args.bs, args.seq, vocab, args.packed))
    cuda = device.type == "cuda"

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):  # warm: first-call costs, autotuning, optimizer state, allocator caches
        timed()
    plain = min(timed() for _ in range(3))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        timed()
    events = prof.key_averages()
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(
        f"# {args.framework} {args.mode} {'packed' if args.packed else 'unpacked'}, bs {args.bs} x {args.seq}, "
        f"{args.dtype} on {device}, weights: {what}"
    )
    print(f"# step {plain * 1e3:.1f} ms (best of 3, unprofiled); aten op calls per step: {n_ops}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))
    if args.shapes:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=32))
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
