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

``--max-seq``: the longest sequence each library trains under a fixed memory cap. One training
step (forward + loss + backward + AdamW step, LoRA r=16 on all projections, batch 1, one document
of ``seq`` tokens, fp32) runs in a fresh process per trial; the parent polls the child's
``/proc/<pid>/status`` and kills it as soon as its RSS high-water mark (``VmHWM``, kept by the
kernel, so no spike between polls is missed) passes the cap. A trial passes when the step
finishes with ``VmHWM <= cap``. The search doubles ``seq`` from ``--start`` until a trial fails,
then bisects on a grid of ``--step`` tokens. Sides, each with its best memory settings:

* ``tinytune``: activation checkpointing + ``activation_offloading: disk`` + chunked fused CE.
* ``hf``: transformers + PEFT, SDPA, ``gradient_checkpointing_enable(use_reentrant=False)``.
* ``torchtune``: activation checkpointing + ``CEWithChunkedOutputLoss``; its activation
  offloading (``OffloadActivations``) is tried and reported when it cannot run (it needs CUDA).

Why an RSS watchdog and not ``RLIMIT_AS`` or a cgroup: ``RLIMIT_AS`` caps virtual memory, which
counts mmap'd files, thread stacks and glibc's per-thread arena reservations that are never
resident (the tinytune worker: VmSize 1515 MiB vs VmRSS 919 MiB after loading the model), and the
gap differs between libraries; a memory cgroup would be the exact tool but needs a writable cgroup
hierarchy (read-only here), and it also charges page cache. The worker restarts ``VmHWM`` after
loading (``/proc/self/clear_refs``) so the step's own peak is reported next to the loading peak;
the cap applies to both.

    python benchmarks/bench_memory.py --max-seq --cap-mib 3072 --step 1024
    python benchmarks/bench_memory.py --max-seq --smoke   # tiny model, tiny cap (used by the tests)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as bt  # noqa: E402 - builds every side exactly as the throughput benchmark does
from _common import (  # noqa: E402
    IGNORE_INDEX,
    Batch,
    current_rss_mib,
    emit_result,
    fmt,
    machine_line,
    peak_rss_mib,
    print_table,
    run_worker,
)

VOCABS = {49152: 576, 151936: 896}  # vocab -> hidden size of the model that uses it
DEFAULT_TORCHTUNE_PYTHON = "/work/bench-venv/bin/python"
DEFAULT_METHODS = "tinytune,plain,torchtune"


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


# ============================================================================ --max-seq

MAXSEQ_SIDES = ("tinytune", "hf", "torchtune")


def _proc_status_kib(pid: int | str, key: str) -> int | None:
    """``key`` (``VmHWM``, ``VmRSS``, ``VmSize``) of a process in KiB from ``/proc/<pid>/status``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _torchtune_training_module(name: str):
    """``torchtune/training/<name>.py`` imported on its own (without ``torchtune.training``'s ``__init__``)."""
    import importlib.util

    import torchtune  # the peer's environment only

    path = os.path.join(os.path.dirname(torchtune.__file__), "training", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_torchtune_training_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def maxseq_worker(spec: dict) -> None:
    """One training step at ``spec["seq"]`` tokens with the side's memory settings; reports VmHWM."""
    import torch  # the worker's library process only (the parent stays light)

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device, dtype = torch.device("cpu"), torch.float32
    seq, side = spec["seq"], spec["side"]
    build = {"tinytune": bt._build_tinytune, "hf": bt._build_hf, "torchtune": bt._build_torchtune}[side]
    model, make_step = build(spec, torch, dtype, device)
    notes = []
    if side == "tinytune":
        from tinytune.training import apply_activation_checkpointing, apply_activation_offloading

        apply_activation_checkpointing(model)
        apply_activation_offloading(
            model, "disk", device, spec["offload_dir"], min_bytes=spec.get("min_bytes", 1 << 20)
        )
    elif side == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from torchtune.modules import TransformerSelfAttentionLayer

        # torchtune.training's __init__ does not import against this torchao (quantization.py needs
        # names torchao removed); its memory and offloading modules do: load those two files alone.
        memory = _torchtune_training_module("memory")
        memory.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        try:
            offload_ctx = _torchtune_training_module("_activation_offloading").get_act_offloading_ctx_manager(
                model, True
            )
        except Exception as e:  # noqa: BLE001 - report why the peer's offloading does not run here
            offload_ctx = None
            notes.append(f"torchtune activation offloading unavailable: {type(e).__name__}: {e}".splitlines()[0])
        if offload_ctx is not None:  # wrap the forward the way torchtune's recipes do
            inner = model.forward

            def forward(*a, **k):
                with offload_ctx:
                    return inner(*a, **k)

            model.forward = forward
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec["vocab"], (1, seq), generator=g)  # [1, s] one document
    labels = tokens.roll(-1, 1)  # [1, s] pre-shifted next-token targets
    labels[:, :16] = IGNORE_INDEX  # a prompt
    labels[:, -1] = IGNORE_INDEX
    batch = Batch(tokens=tokens, labels=labels, input_pos=None, seq_lens=[[seq]], packed=False)
    step = make_step(batch)
    gc.collect()
    load_hwm = _proc_status_kib("self", "VmHWM") / 1024  # the peak of imports + model loading
    rss_before = _proc_status_kib("self", "VmRSS") / 1024
    try:  # restart the high-water mark from the current RSS, so VmHWM below is the step's own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM also covers loading (the cap applies to both either way)
    t0 = time.perf_counter()
    loss = float(step())
    emit_result(
        {
            "seq": seq,
            "loss": loss,
            "time_s": time.perf_counter() - t0,
            "load_hwm_mib": load_hwm,
            "rss_before_mib": rss_before,
            "hwm_mib": max(load_hwm, _proc_status_kib("self", "VmHWM") / 1024),
            "step_hwm_mib": _proc_status_kib("self", "VmHWM") / 1024,
            "notes": notes,
        }
    )


def run_capped(
    python: str,
    script: str,
    spec: dict,
    cap_mib: float,
    timeout: float,
    poll_s: float = 0.05,
    extra_env: dict | None = None,
) -> dict:
    """Runs a ``--worker`` in a fresh process, killed when its RSS high-water mark passes ``cap_mib``.

    Returns:
        The worker's result with ``status`` ``"ok"``, or ``{"status": "over_cap" | "timeout" |
        "error", "hwm_mib": ..., "error": ...}``.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra_env or {})
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([python, script, "--worker", json.dumps(spec)], stdout=out, stderr=err, env=env)
        t0, hwm, status = time.monotonic(), 0.0, None
        while proc.poll() is None:
            kib = _proc_status_kib(proc.pid, "VmHWM")  # the worker may restart it once (never upward)
            hwm = max(hwm, (kib or 0) / 1024)
            if hwm > cap_mib:
                status = "over_cap"
            elif time.monotonic() - t0 > timeout:
                status = "timeout"
            if status:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(poll_s)
        elapsed = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status:
        return {"status": status, "hwm_mib": hwm, "wall_s": elapsed}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            over = res["hwm_mib"] > cap_mib  # the worker's own final VmHWM: exact
            return dict(res, status="over_cap" if over else "ok", wall_s=elapsed)
    tail = "\n".join((stderr or stdout).strip().splitlines()[-4:])
    return {"status": "error", "hwm_mib": hwm, "wall_s": elapsed, "error": f"exit {proc.returncode}: {tail}"}


def search_max_seq(trial, start: int, step: int, limit: int, log=print) -> tuple[int, dict]:
    """Largest ``seq`` (a multiple of ``step``, <= ``limit``) for which ``trial(seq)["status"] == "ok"``.

    Doubles from ``start`` until a failure, then bisects between the last pass and the first
    failure. Returns ``(best, trials)`` with ``best = 0`` when even ``step`` tokens fail;
    ``trials`` maps every tried seq to its result.
    """
    trials: dict[int, dict] = {}

    def ok(seq: int) -> bool:
        r = trials[seq] = trial(seq)
        log(f"  seq {seq:>6}: {r['status']:<8} VmHWM {r.get('hwm_mib', 0):7.0f} MiB  {r.get('wall_s', 0):6.0f} s")
        return r["status"] == "ok"

    start = max(step, start // step * step)
    lo, hi = 0, None  # lo passes (0: nothing yet), hi fails
    seq = start
    while seq <= limit:
        if ok(seq):
            lo, seq = seq, seq * 2
        else:
            hi = seq
            break
    if hi is None:
        return lo, trials  # passed up to the limit
    if lo == 0:  # the start failed: search below it
        if hi == step or not ok(step):
            return 0, trials
        lo = step
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def _per_side(value: str, sides: list[str]) -> dict[str, int]:
    """``"4096"`` (every side) or ``"tinytune=8192,hf=2048"`` (others: the first value given)."""
    if "=" not in value:
        return dict.fromkeys(sides, int(value))
    given = {k.strip(): int(v) for k, v in (item.split("=") for item in value.split(","))}
    default = next(iter(given.values()))
    return {side: given.get(side, default) for side in sides}


def max_seq_main(args, notes: list[str]) -> int:
    """``--max-seq``: binary search per side, then the table."""
    weights, weights_desc = bt.prepare_weights(argparse.Namespace(weights=args.weights, smoke=args.smoke))
    with open(os.path.join(weights, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    methods = args.methods if args.methods != DEFAULT_METHODS else ",".join(MAXSEQ_SIDES)
    sides = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in sides if m not in MAXSEQ_SIDES]
    if unknown:
        raise SystemExit(f"--max-seq: unknown --methods {unknown}; choose from {list(MAXSEQ_SIDES)}")
    pythons = {m: sys.executable for m in sides}
    if "torchtune" in sides:
        if os.path.exists(args.torchtune_python):
            pythons["torchtune"] = args.torchtune_python
        else:
            sides.remove("torchtune")
            notes.append(f"torchtune skipped: {args.torchtune_python} not found")
    script = os.path.abspath(__file__)
    offload_dir = tempfile.mkdtemp(prefix="tinytune_offload_")
    base = dict(
        kind="maxseq",
        weights=weights,
        vocab=vocab,
        mode="lora",
        rank=16,
        alpha=32,
        dtype="fp32",
        device="cpu",
        optim={"lr": 1e-4, "weight_decay": 0.01, "fused": None},
        padding_free=True,
        offload_dir=offload_dir,
        threads=args.threads,
    )
    if args.smoke:
        base["min_bytes"] = 1024
    cap = args.cap_mib
    env = {}
    if args.malloc_mmap_threshold:  # every side alike: glibc returns blocks above this to the OS on free
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.ce_chunk_mib:  # tinytune's fused CE chunk budget (the other sides do not read it)
        env["TINYTUNE_CE_CHUNK_BYTES"] = str(int(args.ce_chunk_mib * 2**20))
    print(f"# bench_memory --max-seq: {machine_line()}")
    print(f"# weights: {weights_desc}; LoRA r=16 on all projections, bs 1, fp32 on cpu; one step per trial")
    print(
        f"# cap {cap:.0f} MiB of RSS (VmHWM watchdog), grid {args.step} tokens, limit {args.limit}, "
        f"{args.trial_timeout:.0f} s per trial, {args.jobs} side(s) at once, env {env or 'default'}",
        flush=True,
    )
    starts = _per_side(args.start, sides)

    def search(side: str) -> tuple[int, dict]:
        spec = dict(base, side=side, framework=side)

        def trial(seq: int) -> dict:
            return run_capped(pythons[side], script, dict(spec, seq=seq), cap, args.trial_timeout, extra_env=env)

        return search_max_seq(
            trial, starts[side], args.step, args.limit, log=lambda msg: print(f"{side}: {msg.strip()}", flush=True)
        )

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each trial is its own process
        found = dict(zip(sides, pool.map(search, sides)))
    rows, best = [], {}
    for side, (n, trials) in found.items():
        best[side] = n
        passed = [r for r in trials.values() if r["status"] == "ok"]
        for seq, r in sorted(trials.items()):
            for note in r.get("notes", []):
                if note not in notes:
                    notes.append(note)
            if r["status"] in ("error", "timeout"):
                notes.append(f"{side} seq {seq}: {r['status']} {r.get('error', '')}".strip())
        top = max(passed, key=lambda r: r["seq"]) if passed else {}
        at_limit = n > 0 and n + args.step > args.limit  # passed at the longest length tried
        rows.append(
            [
                side,
                f">= {n} (limit)" if at_limit else str(n),
                fmt(top.get("loss"), ".4f"),
                fmt(top.get("step_hwm_mib"), ".0f"),
                fmt(top.get("load_hwm_mib"), ".0f"),
                fmt(top.get("rss_before_mib"), ".0f"),
                fmt(top.get("time_s"), ".0f"),
                str(len(trials)),
            ]
        )
    peers = [best[s] for s in best if s != "tinytune"]
    ratio = "-"
    if "tinytune" in best and peers and max(peers) > 0:
        ratio = f"{best['tinytune'] / max(peers):.2f}x"
        if best["tinytune"] + args.step > args.limit:
            ratio = f">= {ratio} (tinytune reached --limit)"
    print()
    print_table(
        [
            "library",
            "max seq",
            "loss",
            "step peak RSS MiB",
            "load peak RSS MiB",
            "RSS before step MiB",
            "step s",
            "trials",
        ],
        rows,
    )
    print(f"\ncap {cap:.0f} MiB; tinytune / best peer: {ratio}")
    for n in notes:
        print(f"note: {n}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--vocabs", default="49152,151936", help="comma-separated; dims: 49152->576, 151936->896")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per case (median reported)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"--max-seq: {','.join(MAXSEQ_SIDES)}")
    p.add_argument("--torchtune-python", default=DEFAULT_TORCHTUNE_PYTHON)
    p.add_argument("--smoke", action="store_true", help="seq 128, vocab 4096 (dim 64); --max-seq: tiny model")
    p.add_argument("--max-seq", action="store_true", help="longest trainable sequence under --cap-mib (see above)")
    p.add_argument("--cap-mib", type=float, default=3072, help="--max-seq: RSS cap in MiB")
    p.add_argument("--step", type=int, default=1024, help="--max-seq: search grid in tokens")
    p.add_argument("--start", default="4096", help="--max-seq: first length tried: N, or SIDE=N,... per side")
    p.add_argument("--jobs", type=int, default=1, help="--max-seq: sides searched at once (memory is per process)")
    p.add_argument("--limit", type=int, default=131072, help="--max-seq: longest length tried")
    p.add_argument("--trial-timeout", type=float, default=900, help="--max-seq: seconds per trial (then: failed)")
    p.add_argument("--threads", type=int, default=0, help="--max-seq: torch threads per trial (0: default)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="--max-seq: MALLOC_MMAP_THRESHOLD_ for every side's worker (0: glibc's dynamic default)",
    )
    p.add_argument(
        "--ce-chunk-mib", type=float, default=0, help="--max-seq: TINYTUNE_CE_CHUNK_BYTES in MiB (0: the default)"
    )
    p.add_argument("--weights", default="bundled", help="--max-seq: bundled | random | PATH to an HF checkpoint dir")
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("kind") == "maxseq":
            maxseq_worker(spec)
        else:
            worker_main(spec)
        return 0
    if args.max_seq:
        return max_seq_main(args, [])

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
