"""Multi-process batch encoding for dataset preprocessing."""

from __future__ import annotations

import multiprocessing as mp
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from tinytune.tokenizers.base import Tokenizer

_WORKER_TOKENIZER = None


def _init_worker(tokenizer: "Tokenizer") -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_inline(tok: "Tokenizer", texts: list[str], add_bos: bool, add_eos: bool) -> list[list[int]]:
    """`tok.encode` over `texts` through the back end's batch hook (one call, no per-text wrapper)."""
    many = getattr(tok, "_encode_many", None)
    if many is None:
        return [tok.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    out = many(texts)
    bos = [tok.bos_id] if add_bos and tok.add_bos_token and tok.bos_id is not None else None
    eos = tok.eos_id if add_eos else None
    if bos is not None:
        out = [bos + ids for ids in out]
    if eos is not None:
        for ids in out:
            ids.append(eos)
    return out


def _encode_chunk(task: tuple[list[str], bool, bool]) -> list[list[int]]:
    texts, add_bos, add_eos = task
    return _encode_inline(_WORKER_TOKENIZER, texts, add_bos, add_eos)


def encode_batch(
    tokenizer: "Tokenizer",
    texts: Sequence[str],
    add_bos: bool,
    add_eos: bool,
    num_workers: int = 1,
    chunk_size: int | None = None,
    mp_context: str | None = None,
) -> list[list[int]]:
    """Encodes `texts` with `tokenizer`, inline or in a process pool; see `Tokenizer.encode_batch`."""
    texts = list(texts)
    if num_workers < 1:
        raise ValueError(f"encode_batch: num_workers must be >= 1, got {num_workers}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode_batch: texts[{i}] is a {type(t).__name__}, expected str")
    if num_workers == 1 or len(texts) < 2:
        return _encode_inline(tokenizer, texts, add_bos, add_eos)
    if chunk_size is None:
        chunk_size = max(1, -(-len(texts) // (num_workers * 4)))
    tasks = [(texts[i : i + chunk_size], add_bos, add_eos) for i in range(0, len(texts), chunk_size)]
    ctx = mp.get_context(mp_context)
    workers = min(num_workers, len(tasks))
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        chunks = pool.map(_encode_chunk, tasks, chunksize=1)
    return [ids for chunk in chunks for ids in chunk]
