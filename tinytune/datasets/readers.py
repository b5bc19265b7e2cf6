"""Row readers: JSON, JSONL, CSV, Parquet, Arrow IPC (file and stream), TXT, directories, globs, lists.

Every reader yields ``(file, row_number, row_dict)`` with 1-based row numbers so errors can point at
the exact place. pyarrow is imported only when a Parquet or Arrow file is read.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tinytune.datasets.data_errors import BadSampleLog, DatasetError

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".ipc", ".feather", ".txt")
LIST_SOURCE = "<list>"

Row = tuple[str, int, dict]


def _plain(obj: Any) -> Any:
    """Turns OmegaConf containers into plain Python objects (no-op otherwise)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: PLC0415 (guarded: datasets work without omegaconf)

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


def is_row_list(source: Any) -> bool:
    """True when ``source`` is an in-memory list of rows (dicts or strings of text)."""
    source = _plain(source)
    return isinstance(source, (list, tuple)) and (len(source) == 0 or isinstance(source[0], Mapping))


def resolve_files(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Expands a file, directory, glob or list of those into a sorted list of data files.

    Raises:
        DatasetError: when nothing matches or a file has an unsupported extension.
    """
    source = _plain(source)
    if isinstance(source, (list, tuple)):
        out: list[str] = []
        for s in source:
            out.extend(resolve_files(s))
        return out
    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.lower().endswith(SUPPORTED_EXTENSIONS)
        )
        if not files:
            raise DatasetError(
                f"directory has no data files ({', '.join(SUPPORTED_EXTENSIONS)})",
                file=path,
                hint="Point `source` at a file, a directory with data files, or a glob",
            )
        return files
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DatasetError("glob matched no files", file=path, hint="Check the pattern and the working directory")
        return files
    if not os.path.exists(path):
        raise DatasetError("file not found", file=path, hint="Check `source` in the dataset config")
    if not path.lower().endswith(SUPPORTED_EXTENSIONS):
        raise DatasetError(
            f"unsupported file type (supported: {', '.join(SUPPORTED_EXTENSIONS)})",
            file=path,
            hint="Convert the file to JSONL or Parquet",
        )
    return [path]


def _read_json(path: str, bad: BadSampleLog | None) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
            file=path,
            hint='Fix the file; a .json file must hold a list of objects or {"data": [...]} '
            "(use .jsonl for one object per line)",
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(
            'expected a list of objects or {"data": [...]}', file=path, hint="Wrap the rows in a JSON list"
        )
    for i, row in enumerate(data, 1):
        yield path, i, row


def _read_jsonl(path: str, bad: BadSampleLog | None) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                err = DatasetError(
                    f"malformed JSON line ({e.msg} at column {e.colno})",
                    file=path,
                    row=i,
                    hint="Fix or remove that line, or set skip_bad_samples: true",
                )
                if bad is None:
                    raise err from None
                bad.add(err)
                continue
            yield path, i, row


def _read_csv(path: str, bad: BadSampleLog | None) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
        reader = csv.DictReader(f)
        for i, row in enumerate(reader, 1):
            if None in row:  # more fields than header columns
                err = DatasetError(
                    f"row has {len(row) - 1 + len(row[None])} fields but the header has {len(reader.fieldnames or [])}",
                    file=path,
                    row=i,
                    hint="Quote fields that contain commas, or set skip_bad_samples: true",
                )
                if bad is None:
                    raise err
                bad.add(err)
                continue
            yield path, i, dict(row)


def _read_txt(path: str, bad: BadSampleLog | None) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if line.strip():
                yield path, i, {"text": line}


def _iter_batches_as_rows(path: str, batches: Any) -> Iterator[Row]:
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            i += 1
            yield path, i, row


def _read_parquet(path: str, bad: BadSampleLog | None) -> Iterator[Row]:
    import pyarrow.parquet as pq  # noqa: PLC0415 (optional: pyarrow)

    yield from _iter_batches_as_rows(path, pq.ParquetFile(path).iter_batches(batch_size=4096))


def _read_arrow(path: str, bad: BadSampleLog | None) -> Iterator[Row]:
    import pyarrow as pa  # noqa: PLC0415 (optional: pyarrow)

    with pa.memory_map(path, "r") as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
            yield from _iter_batches_as_rows(path, batches)
            return
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(path, "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as e:
            raise DatasetError(
                f"not an Arrow IPC file or stream ({e})",
                file=path,
                hint="Write it with pyarrow.ipc.new_file/new_stream or datasets.save_to_disk",
            ) from None
        yield from _iter_batches_as_rows(path, reader)


_READERS = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".txt": _read_txt,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
    ".ipc": _read_arrow,
    ".feather": _read_arrow,
}


def guess_encoding(data: bytes) -> str:
    """A best guess at the encoding of bytes that are not UTF-8 (for the error message)."""
    boms = [
        (b"\xff\xfe\x00\x00", "UTF-32LE"),
        (b"\x00\x00\xfe\xff", "UTF-32BE"),
        (b"\xff\xfe", "UTF-16LE"),
        (b"\xfe\xff", "UTF-16BE"),
    ]
    for bom, name in boms:
        if data.startswith(bom):
            return name
    if data.count(b"\x00") > len(data) // 4:
        return "UTF-16LE" if data[1:2] == b"\x00" else "UTF-16BE"
    for name in ("GB18030", "SHIFT_JIS"):
        try:
            text = data.decode(name)
        except UnicodeDecodeError:
            continue
        if sum("\u3040" <= c <= "\u9fff" for c in text) > sum(ord(c) > 127 for c in text) // 2:
            return name
    try:
        data.decode("cp1252")
        return "CP1252"  # Windows-1252 (Excel on Western Windows)
    except UnicodeDecodeError:
        return "ISO-8859-1"


def _not_utf8(path: str, err: UnicodeDecodeError) -> DatasetError:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    enc = guess_encoding(head)
    return DatasetError(
        f"the file is not UTF-8 (byte 0x{err.object[err.start]:02x} cannot be decoded); it looks like {enc}",
        file=path,
        hint=f"Convert it to UTF-8, e.g. `iconv -f {enc} -t UTF-8 {os.path.basename(path)} > "
        f"utf8_{os.path.basename(path)}`",
    )


def read_file(path: str, bad: BadSampleLog | None = None) -> Iterator[Row]:
    """Yields ``(path, row_number, row)`` for one data file (format from the extension).

    Raises:
        DatasetError: for an unsupported extension or a text file that is not UTF-8 (naming the
            encoding it looks like).
    """
    ext = os.path.splitext(path)[1].lower()
    reader = _READERS.get(ext)
    if reader is None:
        raise DatasetError(f"unsupported file type {ext!r}", file=path, hint="Convert the file to JSONL or Parquet")
    try:
        yield from reader(path, bad)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def iter_rows(source: Any, bad: BadSampleLog | None = None) -> Iterator[Row]:
    """Yields ``(file, row_number, row)`` for a file, directory, glob, list of paths or list of rows.

    Args:
        source: data location or an in-memory list of dicts.
        bad: when given, malformed lines are counted here instead of raising.
    """
    source = _plain(source)
    if is_row_list(source):
        for i, row in enumerate(source, 1):
            yield LIST_SOURCE, i, row
        return
    for path in resolve_files(source):
        yield from read_file(path, bad)


def apply_column_map(row: Any, column_map: Mapping[str, str] | None, file: str, row_no: int) -> dict:
    """Renames dataset columns to tinytune field names.

    ``column_map`` maps a tinytune field name to the dataset's column name, e.g.
    ``{"instruction": "prompt", "output": "answer"}``.

    Raises:
        DatasetError: when the row is not an object or a mapped column is missing.
    """
    if not isinstance(row, Mapping):
        raise DatasetError(
            f"expected an object with named columns, got {type(row).__name__}",
            file=file,
            row=row_no,
            hint="Each row must be a JSON object / table row",
        )
    if not column_map:
        return dict(row)
    out = dict(row)
    for field, column in column_map.items():
        if column not in row:
            raise DatasetError(
                f"missing column {column!r} (mapped to {field!r}); row has {sorted(row)}",
                file=file,
                row=row_no,
                hint="Fix `column_map` in the dataset config or the data file",
            )
        out[field] = row[column]
        if column != field and column in out and column not in column_map:
            del out[column]
    return out
