"""Reading DCP checkpoints without unpickling code.

``torch.distributed.checkpoint`` keeps its ``.metadata`` file as a plain pickle and loads every
non-tensor value of a state dict (e.g. an optimizer's ``param_groups``) with
``torch.load`` with weights_only switched off: a crafted checkpoint directory would run code on resume.
:class:`SafeFileSystemReader` unpickles the metadata with an allow-list of the classes DCP itself
writes there, and :class:`SafeLoadPlanner` loads non-tensor values with ``weights_only=True``.
Both raise :class:`UnsafeCheckpointError` naming the file and what was refused.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint import metadata as _dcp_meta
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import ReadItem

from tinytune.errors import ResumeError

# What DCP's own .metadata pickle references (torch 2.6-2.13): its dataclasses, torch.Size,
# dtypes, the layout helper and paths. Anything else is refused.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}
_MODULES = {"torch.distributed.checkpoint.metadata": _dcp_meta, "torch.distributed.checkpoint.filesystem": _dcp_fs}


class UnsafeCheckpointError(ResumeError):
    """A checkpoint file references code or classes that a checkpoint never needs."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))
        ):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            if module in _MODULES:
                return getattr(_MODULES[module], name)
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refers to {module}.{name}, which a DCP checkpoint's metadata never holds; the file "
            "was not written by torch.distributed.checkpoint (or was tampered with). Not loaded: start fresh "
            "with resume_from_checkpoint: null, or restore the checkpoint from a trusted copy"
        )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` unpickling accepts only DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> _dcp_meta.Metadata:  # noqa: D102
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, os.fspath(path)).load()
        if not isinstance(metadata, _dcp_meta.Metadata):
            raise UnsafeCheckpointError(f"{os.fspath(path)}: holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = _dcp_meta.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:  # noqa: D102
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} holds pickled code or classes "
                f"({str(e).splitlines()[0]}); not loaded: start fresh with resume_from_checkpoint: null, or "
                "restore the checkpoint from a trusted copy"
            ) from None
        # as DefaultLoadPlanner.load_bytes, with the safe load above
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state_dict: dict, path: str | os.PathLike, **kwargs: Any) -> None:
    """``dcp.load(state_dict, ...)`` from ``path`` with :class:`SafeFileSystemReader` and
    :class:`SafeLoadPlanner` (every rank calls it, as ``dcp.load``).

    Raises:
        UnsafeCheckpointError: the metadata or a non-tensor entry refers to code (checked before
            any tensor is read; DCP's own error wrapping is undone so the message stays short).
    """
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # the allow-list check, with our own error (dcp.load would bury it)
    try:
        dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        raise
