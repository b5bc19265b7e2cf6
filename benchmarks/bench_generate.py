"""Greedy decoding throughput: tinytune ``generate`` vs HF ``model.generate`` on the same weights.

Both sides load the same HF directory (the bundled SmolLM2-135M-Instruct conversion, or a random
init of that shape), decode the same left-padded prompts greedily with a KV cache for exactly
``--new-tokens`` tokens (no early stop), in the same process, rounds interleaved (ours, HF, ours,
HF, ...). Reported per batch size: new tokens/s (median round), the ratio ours/HF by wall time
and by CPU time (user+sys of the process: the steadier one on a machine shared with other jobs),
and the share of generated tokens on which both sides agree (a cross-check that they decode the
same thing; fp32 greedy can part ways only where two logits tie to rounding).

    python benchmarks/bench_generate.py                       # batch 1 and 8, 64 new tokens
    python benchmarks/bench_generate.py --batch-sizes 1,8 --new-tokens 128 --rounds 5
    python benchmarks/bench_generate.py --smoke               # tiny model, seconds (used by the tests)
    python benchmarks/bench_generate.py --decode-layout       # also tinytune inside decode_layout()
    python benchmarks/bench_generate.py --profile 32          # + torch.profiler table of a 32-token call per side

``--decode-layout`` adds a third side in the same rounds: a second copy of the tinytune model held
in ``tinytune.generation.decode_layout`` (its decode plan: fused, column-major, MKL-packed weights and
the lean one-position step) for the whole run; the one-off costs of entering it and of the first
call per batch size (packing for batches > 1) are printed separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt, machine_line, median, print_table  # noqa: E402
from bench_train import prepare_weights  # noqa: E402


def _prompts(batch_size: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Prompts of varied length (so batches are left-padded), token ids away from 0 (the pad id)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (batch_size,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]


def _ours(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from tinytune.generation import generate

    return generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0, stop_tokens=[], pad_id=0)


def _hf(model, prompts: list[list[int]], new_tokens: int, cache: str) -> list[list[int]]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [b, L] left-padded
    attn = torch.zeros(len(prompts), width, dtype=torch.long)  # [b, L]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    if cache != "dynamic":
        kwargs["cache_implementation"] = cache
    out = model.generate(input_ids=ids, attention_mask=attn, **kwargs)  # [b, L + new]
    return out[:, width:].tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="bundled", help="bundled | random | an HF directory")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", default="24,64", help="min,max prompt length in tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--hf-cache", default="dynamic", help="HF cache_implementation: dynamic | static")
    p.add_argument("--smoke", action="store_true", help="tiny random model, few tokens")
    p.add_argument(
        "--decode-layout", action="store_true", help="also time tinytune inside decode_layout() (same rounds)"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the rounds, print torch.profiler's per-op table of one tinytune generate call of N new "
        "tokens per batch size (prefill + N - 1 decode steps)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.weights, args.new_tokens, args.rounds, args.prompt_len = "random", 8, 1, "4,9"

    import torch
    from transformers import AutoModelForCausalLM

    from tinytune.checkpoint import load_hf_model
    from tinytune.generation import decode_layout

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights, what = prepare_weights(args)
    ours, _ = load_hf_model(weights, dtype=torch.float32, device="cpu")
    ours.eval()
    hf = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    sides = {"tinytune": ours}
    layout_note = ""
    if args.decode_layout:
        laid_out, _ = load_hf_model(weights, dtype=torch.float32, device="cpu")
        laid_out.eval()
        layout_ctx = decode_layout(laid_out)
        c0, t0 = time.process_time(), time.perf_counter()
        layout_ctx.__enter__()  # held for the whole run, closed at exit
        layout_note = (
            f"; decode_layout: entered once in {time.perf_counter() - t0:.2f} s "
            f"({time.process_time() - c0:.2f} CPU-s), not in the per-call times"
        )
        sides["tinytune+layout"] = laid_out
    vocab = ours.tok_embeddings.num_embeddings
    lo, hi = (int(x) for x in args.prompt_len.split(","))

    rows, profiles, first_calls = [], [], []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        prompts = _prompts(bs, vocab, lo, hi, seed=bs)
        with torch.inference_mode():
            for name, model in sides.items():  # warm-up every side (allocator, kernels)
                t0 = time.perf_counter()
                _ours(model, prompts, 2)
                if name == "tinytune+layout":  # its first call per batch size packs the weights (batch > 1)
                    first_calls.append(f"batch {bs}: {time.perf_counter() - t0:.2f} s")
            _hf(hf, prompts, 2, args.hf_cache)
            names = [*sides, "hf"]
            times = {name: [] for name in names}
            cpu = {name: [] for name in names}
            outs = {}
            for _ in range(args.rounds):
                for name in names:
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs[name] = (
                        _hf(hf, prompts, args.new_tokens, args.hf_cache)
                        if name == "hf"
                        else _ours(sides[name], prompts, args.new_tokens)
                    )
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        for name in sides if args.profile else ():
            with (
                torch.inference_mode(),
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
            ):
                _ours(sides[name], prompts, args.profile)
            profiles.append((bs, name, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)))
        total = bs * args.new_tokens
        assert all(len(r) == args.new_tokens for o in outs.values() for r in o), "a side stopped early"
        tps = {k: total / median(v) for k, v in times.items()}
        cpu_ms = {k: 1000 * median(v) / args.new_tokens for k, v in cpu.items()}  # CPU ms per decode step
        for name in sides:
            agree = sum(a == b for ra, rb in zip(outs[name], outs["hf"]) for a, b in zip(ra, rb))
            rows.append(
                [
                    str(bs),
                    name,
                    fmt(tps[name]),
                    fmt(tps["hf"]),
                    fmt(tps[name] / tps["hf"], ".2f") + "x",
                    fmt(cpu_ms[name]),
                    fmt(cpu_ms["hf"]),
                    fmt(cpu_ms["hf"] / cpu_ms[name], ".2f") + "x",
                    f"{agree}/{total}",
                ]
            )

    for bs, name, table in profiles:
        print(f"torch.profiler, {name} generate, batch {bs}, {args.profile} new tokens (self CPU time):")
        print(table)
    print(machine_line())
    print(
        f"weights: {what}; fp32; greedy, {args.new_tokens} new tokens, prompts {lo}-{hi} tokens (left-padded); "
        f"HF cache: {args.hf_cache}; {args.rounds} rounds, median; torch threads {torch.get_num_threads()}"
        f"{layout_note}"
    )
    if first_calls:
        print(f"tinytune+layout: first (warm-up, 2-token) call per batch size, not timed: {', '.join(first_calls)}")
    headers = ["batch", "side", "ours tok/s", "HF tok/s", "speed vs HF", "ours CPU ms/step", "HF CPU ms/step"]
    print_table(headers + ["CPU-s HF/ours", "same tokens"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
