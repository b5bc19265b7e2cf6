"""Shared helpers for the benchmark scripts: fresh-process workers, memory probes, batches, tables.

Every measured configuration runs in its own Python process (``run_worker``) so peak-memory
high-water marks of different configurations never mix, and so each side imports only its own
library. The worker prints one JSON line prefixed with ``RESULT `` that the parent parses.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

RESULT_PREFIX = "RESULT "
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------- processes


def run_worker(python: str, script: str, spec: dict, timeout: float | None = None) -> dict:
    """Runs ``python script --worker JSON`` in a fresh process and returns its result dict.

    Args:
        python: interpreter to use (a peer may live in another virtual environment).
        script: path of the benchmark script (it must handle ``--worker``).
        spec: JSON-serialisable description of the configuration.
        timeout: seconds before the worker is killed.

    Returns:
        The worker's result dict, or ``{"error": "..."}`` when it failed (last stderr lines kept).
    """
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [python, script, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
    return {"error": f"exit {proc.returncode}: {tail}"}


def emit_result(result: dict) -> None:
    """Worker side: print the result line the parent looks for."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------- memory


def current_rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the high-water mark
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set size in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ------------------------------------------------------------------------------- machine


def machine_line() -> str:
    """One line describing the machine and its current load (for tables and RESULTS.md)."""
    try:
        load = "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load n/a"
    return f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}, {load}"


# ------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A training batch in the tinytune layout (labels pre-shifted).

    Attributes:
        tokens: ``[b, s]`` int64 ids.
        labels: ``[b, s]`` int64 targets (``labels[i]`` is the target of position ``i``), -100 masked.
        input_pos: ``[b, s]`` positions restarting at 0 per document.
        seq_lens: per row, the document lengths (sum to ``s``).
        packed: whether rows hold several documents.
    """

    tokens: object
    labels: object
    input_pos: object
    seq_lens: list[list[int]]
    packed: bool

    @property
    def label_tokens(self) -> int:
        """Number of supervised tokens."""
        return int((self.labels != IGNORE_INDEX).sum())


def make_batch(bs: int, seq: int, vocab: int, packed: bool, seed: int = 0, prompt_len: int = 16) -> Batch:
    """A deterministic synthetic SFT batch: random token ids, prompt-masked labels.

    Unpacked: each row is one document of random length in ``[seq/2, seq]``, right-padded (pad
    positions are unlabelled; right padding needs no attention mask under causal attention).
    Packed: each row is filled with documents of random length in ``[seq/8, seq/2]`` (the last one
    cut to fit), positions restart at 0 per document.
    In every document the first ``prompt_len`` positions and the last one carry no label.

    Args:
        bs: rows.
        seq: row length.
        vocab: token ids are drawn from ``[0, vocab)``.
        packed: pack several documents per row.
        seed: RNG seed (same seed -> same batch in every process).
        prompt_len: unlabelled prefix per document.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bs, seq), generator=g)
    labels = torch.full((bs, seq), IGNORE_INDEX, dtype=torch.long)
    input_pos = torch.zeros((bs, seq), dtype=torch.long)
    seq_lens: list[list[int]] = []
    for r in range(bs):
        if packed:
            lens, left = [], seq
            while left > 0:
                n = int(torch.randint(max(seq // 8, 2), max(seq // 2, 3) + 1, (1,), generator=g))
                lens.append(min(n, left))
                left -= lens[-1]
        else:
            n = int(torch.randint(max(seq // 2, 2), seq + 1, (1,), generator=g))
            lens = [n] + ([seq - n] if n < seq else [])
        start = 0
        for i, n in enumerate(lens):
            input_pos[r, start : start + n] = torch.arange(n)
            is_pad = not packed and i == 1
            if not is_pad:
                # pre-shifted: position j predicts token j + 1 of the same document
                lo = start + min(prompt_len, n - 1)
                labels[r, lo : start + n - 1] = tokens[r, lo + 1 : start + n]
            start += n
        seq_lens.append(lens)
    return Batch(tokens=tokens, labels=labels, input_pos=input_pos, seq_lens=seq_lens, packed=packed)


def seq_lens_tensor(batch: Batch):
    """``[b, max_docs]`` zero-padded document lengths (tinytune's packed collate layout)."""
    import torch

    width = max(len(x) for x in batch.seq_lens)
    return torch.tensor([x + [0] * (width - len(x)) for x in batch.seq_lens], dtype=torch.long)


# ------------------------------------------------------------------------------- stats / tables


def best_time(fn, repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn`` (no warm-up call: make one first if needed)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def median(xs: list[float]) -> float:
    """Median, NaN for an empty list."""
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float | None, spec: str = ".1f") -> str:
    """Format a number, '-' for missing/NaN."""
    if x is None or x != x:
        return "-"
    return format(x, spec)


def print_table(headers: list[str], rows: list[list[str]]) -> str:
    """Print (and return) a GitHub-markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in rows]
    text = "\n".join(out)
    print(text, flush=True)
    return text
