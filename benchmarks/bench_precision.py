"""Loss curves of the identity demo in fp32, pure bf16 and mixed precision (bf16 compute, fp32 master weights).

Runs ``lora_finetune`` with ``configs/smollm2/135M_identity_demo.yaml`` three times, the same data
order, seed and number of steps, differing only in precision:

* ``fp32``: ``dtype: fp32``;
* ``bf16``: ``dtype: bf16`` (weights, gradients, AdamW state in bf16);
* ``mixed``: ``dtype: bf16`` + ``mixed_precision: true`` (bf16 base and compute, fp32 adapters and AdamW state).

Each run is a fresh process (so peak RSS is its own) logging the loss of every step. The script
writes the curves to ``--json``, prints a table (final loss, mean loss over the last 50 steps,
largest relative deviation of the smoothed curve from fp32's, median CPU seconds per step, peak
RSS, held-out accuracy of the demo) and draws the curves into ``--plot`` (matplotlib).

Smoothed curve: the trailing mean of the last ``--smooth`` (default 10) per-step losses. The
deviation of a precision ``x`` at step ``t`` is ``|S_x(t) - S_fp32(t)| / S_fp32(t)``; the table
reports its maximum over ``t >= smooth`` and over the last 50 steps.

    python benchmarks/bench_precision.py                          # 200 steps, the demo's batch (8 rows)
    python benchmarks/bench_precision.py --steps 20 --batch-size 4
    python benchmarks/bench_precision.py --analyze-only --out-dir DIR   # table/plot from finished runs
    python benchmarks/bench_precision.py --smoke                  # tiny random model, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_line, median, print_table  # noqa: E402

MODES = {
    "fp32": ["dtype=fp32"],
    "bf16": ["dtype=bf16"],
    "mixed": ["dtype=bf16", "+mixed_precision=true"],
}
DEMO_CONFIG = "smollm2/135M_identity_demo"


# ================================================================================ worker side


def worker_main(args) -> None:
    """One run of the recipe; per-step CPU seconds recorded around the recipe's progress ticks."""
    import torch

    import recipes.lora_finetune as recipe
    from tinytune.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_steps: list[float] = []

    class CPUTimedProgress(recipe.TrainProgress):
        """The recipe's progress bar, also recording the process CPU time of every step."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self._cpu = time.process_time()

        def tick(self) -> float:
            now = time.process_time()
            cpu_steps.append(now - self._cpu)
            self._cpu = now
            return super().tick()

    recipe.TrainProgress = CPUTimedProgress
    out = os.path.join(args.out_dir, args.worker)
    overrides = MODES[args.worker] + [
        f"output_dir={out}",
        f"max_steps={args.steps}",
        f"batch_size={args.batch_size}",
        "log_every_n_steps=1",
        "checkpoint_every_n_steps=100000",
        "resume_from_checkpoint=null",
        "metric_loggers=[jsonl]",
    ]
    if args.smoke:
        overrides += ["sample_generation.max_new_tokens=4"]
    overrides += args.override
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    summary = recipe.recipe_main(cfg)
    result = {
        "mode": args.worker,
        "cpu_steps": cpu_steps,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "held_out_correct_before": summary.get("held_out_correct_before"),
        "held_out_correct_after": summary.get("held_out_correct_after"),
        "overrides": overrides,
    }
    with open(os.path.join(out, "bench_precision.json"), "w") as f:
        json.dump(result, f)


# ================================================================================ parent side


def read_losses(path: str) -> dict[int, float]:
    """Per-step training loss from a run's ``metrics.jsonl``."""
    losses = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row and "step" in row:
                losses[int(row["step"])] = float(row["loss"])
    return losses


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def analyze(args) -> int:
    runs = {}
    for mode in MODES:
        d = os.path.join(args.out_dir, mode)
        metrics, res = os.path.join(d, "metrics.jsonl"), os.path.join(d, "bench_precision.json")
        if not (os.path.isfile(metrics) and os.path.isfile(res)):
            print(f"note: {mode}: no finished run in {d}")
            continue
        losses = read_losses(metrics)
        with open(res) as f:
            runs[mode] = dict(json.load(f), steps=sorted(losses), loss=[losses[s] for s in sorted(losses)])
    if "fp32" not in runs:
        print("error: the fp32 run is missing; nothing to compare against")
        return 1
    w, ref = args.smooth, smoothed(runs["fp32"]["loss"], args.smooth)
    headers = [
        "precision",
        "steps",
        "final loss",
        "mean loss, last 50",
        "max rel. dev. smoothed",
        "max rel. dev., last 50",
        "CPU s/step",
        "peak RSS MiB",
        "held-out before -> after",
    ]
    rows = []
    for mode, r in runs.items():
        s = smoothed(r["loss"], w)
        n = min(len(s), len(ref))
        dev = [abs(s[t] - ref[t]) / ref[t] for t in range(w - 1, n)]
        tail = r["loss"][-50:]
        r.update(smoothed=s, rel_dev=dev, max_rel_dev=max(dev) if dev else 0.0)
        r["max_rel_dev_last50"] = max(dev[-50:]) if dev else 0.0
        held = f"{r.get('held_out_correct_before')} -> {r.get('held_out_correct_after')}"
        rows.append(
            [
                mode,
                str(len(r["loss"])),
                f"{r['loss'][-1]:.4f}",
                f"{sum(tail) / len(tail):.4f}",
                "-" if mode == "fp32" else f"{100 * r['max_rel_dev']:.2f}%",
                "-" if mode == "fp32" else f"{100 * r['max_rel_dev_last50']:.2f}%",
                f"{median(r['cpu_steps']):.2f}",
                f"{r['peak_rss_mib']:.0f}",
                held,
            ]
        )
    print(f"# bench_precision: {machine_line()}; smoothing window {w} steps")
    print_table(headers, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "smooth": w, "args": vars(args), "runs": runs}, f, indent=1)
        print(f"curves: {args.json}")
    if args.plot:
        plot(runs, args.plot, w)
    return 0


def plot(runs: dict, path: str, window: int) -> None:
    try:
        import matplotlib  # noqa: PLC0415 (optional: matplotlib, the [plot] extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: matplotlib)
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'tinytune[plot]')")
        return
    fig, (ax, axd) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    colors = {"fp32": "black", "bf16": "tab:red", "mixed": "tab:blue"}
    for mode, r in runs.items():
        ax.plot(r["steps"], r["loss"], color=colors[mode], alpha=0.2, lw=0.8)
        ax.plot(r["steps"], r["smoothed"], color=colors[mode], lw=1.6, label=f"{mode} ({window}-step mean)")
        if mode != "fp32":
            axd.plot(
                r["steps"][window - 1 : window - 1 + len(r["rel_dev"])],
                [100 * d for d in r["rel_dev"]],
                color=colors[mode],
                label=mode,
            )
    ax.set_yscale("log")
    ax.set_ylabel("training loss (per step, log scale)")
    ax.set_title("identity demo (SmolLM2-135M LoRA): fp32 vs pure bf16 vs mixed")
    ax.legend()
    axd.axhline(2.0, color="gray", ls="--", lw=0.8)
    axd.set_ylabel("|smoothed - fp32| / fp32 (%)")
    axd.set_xlabel("step")
    axd.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (the demo's: 8)")
    p.add_argument("--modes", default="fp32,bf16,mixed")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: PyTorch default)")
    p.add_argument("--sequential", action="store_true", help="one run at a time (default: all at once)")
    p.add_argument("--smooth", type=int, default=10, help="trailing-mean window of the smoothed curves")
    p.add_argument("--out-dir", default="outputs/bench_precision")
    p.add_argument("--json", default=None, help="curves + table data (default: OUT_DIR/precision_curves.json)")
    p.add_argument("--plot", default=None, help="PNG (default: OUT_DIR/precision_curves.png)")
    p.add_argument("--analyze-only", action="store_true", help="table/plot from the runs already in --out-dir")
    p.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out_dir = os.path.abspath(args.out_dir)
    args.json = args.json or os.path.join(args.out_dir, "precision_curves.json")
    args.plot = args.plot or os.path.join(args.out_dir, "precision_curves.png")
    if args.worker:
        worker_main(args)
        return 0
    if not args.analyze_only:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for m in modes:
            if m not in MODES:
                p.error(f"--modes: unknown {m!r}; choose from {list(MODES)}")
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"# bench_precision: {machine_line()}")
        print(f"# {args.config}: {args.steps} steps x {args.batch_size} rows, threads {args.threads}, modes {modes}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        base = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--out-dir", args.out_dir]
        base += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        base += [a for o in args.override for a in ("--override", o)] + (["--smoke"] if args.smoke else [])
        procs = []
        for m in modes:
            log = open(os.path.join(args.out_dir, f"{m}.log"), "w")
            procs.append((m, subprocess.Popen(base + ["--worker", m], env=env, stdout=log, stderr=subprocess.STDOUT)))
            if args.sequential:
                procs[-1][1].wait()
        failed = [m for m, pr in procs if pr.wait() != 0]
        if failed:
            print(f"error: run(s) {failed} failed; see {args.out_dir}/<mode>.log")
            return 1
    return analyze(args)


if __name__ == "__main__":
    sys.exit(main())
