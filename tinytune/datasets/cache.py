"""Memory-mapped token cache: tokenize once (several worker processes), read lazily forever after.

Layout of one cache entry ``<cache_dir>/<key>/``::

    tokens.bin    int32 [n_tokens]     all sequences back to back
    labels.bin    int32 [n_tokens]     pre-shifted labels (-100 = masked)
    offsets.bin   int64 [n_seq + 1]    sequence i is [offsets[i], offsets[i+1])
    meta.json     counts, skipped rows, what the key was made of

``key`` hashes the data files (content for files up to 256 MiB, else size + mtime), the tokenizer
(vocabulary size, special tokens, a probe encoding, its files if it names them), the template and
every option that changes the tokens. Entries are written to a temporary directory and renamed
into place, so a crash never leaves a half-written cache; a file lock keeps concurrent builders
(e.g. several ranks) from doing the work twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from tinytune.datasets.data_errors import BadSampleLog, DatasetError
from tinytune.datasets.encoding import DROP_REASONS
from tinytune.datasets.readers import _plain, is_row_list, resolve_files

log = logging.getLogger("tinytune.datasets")

CACHE_VERSION = 2
_CONTENT_HASH_LIMIT = 256 << 20
_PROBE = "Hello, world! 123 héllo 你好 <tab>\t\n  end. The quick brown fox."


def default_cache_dir() -> str:
    """``$TINYTUNE_HOME/data_cache`` (default ``~/.cache/tinytune/data_cache``)."""
    home = os.environ.get("TINYTUNE_HOME", os.path.join(os.path.expanduser("~"), ".cache", "tinytune"))
    return os.path.join(home, "data_cache")


def _hash_file(path: str) -> str:
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{os.path.abspath(path)}|{st.st_size}".encode())
    if st.st_size > _CONTENT_HASH_LIMIT:
        h.update(str(st.st_mtime_ns).encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint_source(source: Any) -> Any:
    """A JSON-able fingerprint of a data source (file hashes, or a hash of in-memory rows)."""
    source = _plain(source)
    if is_row_list(source):
        blob = json.dumps(source, sort_keys=True, default=str).encode()
        return {"rows": hashlib.blake2b(blob, digest_size=16).hexdigest()}
    if callable(source):
        return {"callable": f"{getattr(source, '__module__', '')}.{getattr(source, '__qualname__', repr(source))}"}
    return {"files": [[os.path.abspath(p), _hash_file(p)] for p in resolve_files(source)]}


def fingerprint_tokenizer(tokenizer) -> str:
    """Hash of what decides token ids: class, vocabulary size, specials, a probe encoding, a sample of
    the vocabulary, and the tokenizer's files when it names them (``path``/``model_path``/``files``)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__qualname__.encode())
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)}".encode())
    h.update(json.dumps(sorted((getattr(tokenizer, "special_tokens", None) or {}).items())).encode())
    h.update(json.dumps(tokenizer.encode(_PROBE, add_bos=False, add_eos=False)).encode())
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)
    for i in range(0, vocab, max(1, vocab // 512)):  # a sample of the vocabulary itself
        try:
            h.update(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - ids without a piece (gaps) still count as "no piece"
            h.update(b"\x00")
    for attr in ("path", "model_path", "files"):
        p = getattr(tokenizer, attr, None)
        paths = p if isinstance(p, (list, tuple)) else [p]
        for q in paths:
            if isinstance(q, (str, os.PathLike)) and os.path.isfile(q):
                h.update(_hash_file(os.fspath(q)).encode())
    return h.hexdigest()


def fingerprint_template(template) -> Any:
    """JSON-able description of a template (its fields or its Jinja source)."""
    if template is None:
        return None
    if dataclasses.is_dataclass(template):
        return dataclasses.asdict(template)
    return {
        "class": type(template).__qualname__,
        "source": hashlib.blake2b((getattr(template, "chat_template", "") or "").encode(), digest_size=16).hexdigest(),
        "end_of_turn": list(getattr(template, "end_of_turn", []) or []),
        "bos": getattr(template, "bos_token", ""),
        "eos": getattr(template, "eos_token", ""),
        "template_kwargs": getattr(template, "template_kwargs", None),
        "masking": getattr(template, "MASKING", None),
    }


def cache_key(parts: dict) -> str:
    """Stable hex key for a dict of JSON-able parts."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class TokenCache:
    """Read-only view of a cache entry (numpy memmaps; nothing is loaded until indexed)."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        self.offsets = np.fromfile(os.path.join(path, "offsets.bin"), dtype=np.int64)
        n = int(self.offsets[-1]) if len(self.offsets) else 0
        if n:
            self.tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=np.int32, mode="r", shape=(n,))
            self.labels = np.memmap(os.path.join(path, "labels.bin"), dtype=np.int32, mode="r", shape=(n,))
        else:
            self.tokens = self.labels = np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Sequence lengths, int64 [n_seq]."""
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and labels of sequence ``i`` (int32 views into the memmaps)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.labels[a:b]

    def __getstate__(self):  # DataLoader workers re-open the memmaps instead of pickling data
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


# -- building ------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(encoder, to_sample: Callable) -> None:
    _WORKER["encoder"] = encoder
    _WORKER["to_sample"] = to_sample


def _work(chunk: list[tuple[str, int, Any]]):
    """Converts and encodes one chunk of rows. Returns flat arrays plus per-row outcomes."""
    encoder, to_sample = _WORKER["encoder"], _WORKER["to_sample"]
    samples, outcomes, keep, columns = [], [], [], {}
    for file, row_no, row in chunk:
        if isinstance(row, Mapping):
            for c in row:
                columns[str(c)] = columns.get(str(c), 0) + 1
        try:
            samples.append(to_sample(row, file, row_no))
            keep.append(len(outcomes))
            outcomes.append(None)
        except DatasetError as e:
            outcomes.append(("error", e.message, e.file, e.row, e.hint))
    tokens, labels, lengths, results = encoder.encode_samples_flat(samples)
    reasons = getattr(encoder, "last_reasons", [None] * len(samples))
    for j, (k, res) in enumerate(zip(keep, results)):
        file, row_no, _ = chunk[k]
        if isinstance(res, str):
            outcomes[k] = (
                ("dropped", res)
                if res in DROP_REASONS
                else ("error", res, file, row_no, "Fix the row, pick another template, or set skip_bad_samples: true")
            )
            continue
        outcomes[k] = ("ok", res, reasons[j], getattr(samples[j], "unused", ()))
    return tokens, labels, lengths, (outcomes, columns)


def _chunks(rows: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def build_cache(
    path: str,
    rows: Iterable,
    encoder,
    to_sample: Callable,
    *,
    num_workers: int = 1,
    skip_bad_samples: bool = False,
    bad: BadSampleLog | None = None,
    chunk_size: int = 256,
    group: int = 1,
    extra_meta: dict | None = None,
) -> TokenCache:
    """Tokenizes ``rows`` into a new cache entry at ``path`` (atomically).

    Args:
        path: final entry directory (must not exist yet).
        rows: iterable of ``(file, row_number, row)``.
        encoder: a :class:`~tinytune.datasets.encoding.SampleEncoder`.
        to_sample: ``(row, file, row_number) -> sample``; raises ``DatasetError`` for bad rows.
        num_workers: tokenizer processes (1 = in this process).
        skip_bad_samples: count bad rows instead of raising.
        bad: where counts go (reader errors are counted there too).
        chunk_size: rows per work item.
        group: sequences per sample (2 for chosen/rejected pairs).
        extra_meta: stored in ``meta.json``.

    Raises:
        DatasetError: for a bad row when ``skip_bad_samples`` is False, or when no sample survives.
    """
    bad = bad if bad is not None else BadSampleLog()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    t0 = time.time()
    n_rows = 0
    try:
        ftok = open(os.path.join(tmp, "tokens.bin"), "wb")
        flab = open(os.path.join(tmp, "labels.bin"), "wb")
        lengths_all: list[np.ndarray] = []
        trained = 0
        truncated: dict[str, int] = {}
        unused: dict[str, int] = {}
        columns: dict[str, int] = {}
        _init_worker(encoder, to_sample)
        chunks = _chunks(rows, chunk_size)
        head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
        chunks = itertools.chain(head, chunks)
        pool = None
        if num_workers > 1 and len(head) > 1:  # one chunk of work: no processes to start
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(encoder, to_sample))
        try:
            results = pool.imap(_work, chunks) if pool else map(_work, chunks)
            for tokens, labels, lengths, (outcomes, cols) in results:
                n_rows += len(outcomes)
                for c, n in cols.items():
                    columns[c] = columns.get(c, 0) + n
                for out in outcomes:
                    if out[0] == "error":
                        err = DatasetError(out[1], file=out[2], row=out[3], hint=out[4])
                        if not skip_bad_samples:
                            raise err
                        bad.add(err)
                    elif out[0] == "dropped":
                        bad.drop(out[1])
                    else:
                        if out[2]:
                            truncated[out[2]] = truncated.get(out[2], 0) + 1
                        for c in out[3]:
                            unused[c] = unused.get(c, 0) + 1
                trained += int((labels != -100).sum())
                tokens.tofile(ftok)
                labels.tofile(flab)
                lengths_all.append(lengths)
        except BaseException:
            if pool is not None:
                pool.terminate()
                pool.join()
            raise
        if pool is not None:
            pool.close()
            pool.join()
        _fsync_close(ftok)
        _fsync_close(flab)
        lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, dtype=np.int64)
        if len(lengths) == 0:
            raise DatasetError(
                f"no usable samples in {n_rows} row(s) (skipped {bad.count} bad, dropped "
                f"{sum(bad.dropped.values())}: {bad.dropped or 'none'})",
                hint="Check the data source, `style`/`column_map`, and `max_seq_len`",
            )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with open(os.path.join(tmp, "offsets.bin"), "wb") as f:
            offsets.tofile(f)
            _fsync_close(f)
        meta = {
            "version": CACHE_VERSION,
            "rows": n_rows,
            "sequences": int(len(lengths)),
            "group": group,
            "tokens": int(offsets[-1]),
            "trained_tokens": trained,
            "skipped_bad": bad.count,
            "dropped_too_long": bad.dropped_too_long,
            "dropped": dict(bad.dropped),
            "truncated": truncated,
            "columns": columns,
            "unused_columns": unused,
            "bad_examples": bad.examples,
            "build_seconds": round(time.time() - t0, 3),
            "num_workers": num_workers,
            **(extra_meta or {}),
        }
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, default=str)
            _fsync_close(f)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCache(path)


class _FileLock:
    """Exclusive advisory lock on ``path`` (no-op where fcntl is unavailable)."""

    def __init__(self, path: str):
        self.path = path
        self.f = None

    def __enter__(self):
        try:
            import fcntl  # noqa: PLC0415 (POSIX only (file locks))
        except ImportError:  # pragma: no cover
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            import fcntl  # noqa: PLC0415 (POSIX only (file locks))

            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


def load_or_build(cache_dir: str, key: str, build: Callable[[str], TokenCache]) -> tuple[TokenCache, bool]:
    """Opens the entry ``key`` or builds it with ``build(path)``. Returns ``(cache, was_hit)``."""
    path = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(path, "meta.json")):
        return TokenCache(path), True
    with _FileLock(os.path.join(cache_dir, f".{key}.lock")):
        if os.path.isfile(os.path.join(path, "meta.json")):
            return TokenCache(path), True
        return build(path), False
