"""Activation offloading: tensors saved for backward leave the compute memory during forward.

``torch.autograd.graph.saved_tensors_hooks`` intercepts every tensor an op saves for backward
(``pack``) and hands it back when backward needs it (``unpack``). :class:`ActivationOffloader`
moves the large ones out of the way:

* ``pinned`` (setting ``activation_offloading: true``, CUDA): a copy to page-locked host memory on
  a side stream (the compute stream does not wait for it), and back on the same side stream in
  backward, prefetching the tensors backward will ask for next (packed earlier).
* ``disk`` (setting ``activation_offloading: disk``, any device): on CPU the "host" is the same
  memory, so the tensor goes to an unlinked temporary file instead and is read back in backward.
  The process's resident memory (RSS) drops by its size; the file's pages sit in the kernel's
  page cache (not part of RSS, reclaimable, written back under memory pressure).

Tensors below ``min_bytes``, parameters, buffers and any tensor sharing storage with them stay
where they are (they are alive anyway). A storage saved several times (one input read by the q, k
and v projections, or by views of it) is offloaded once and restored once per backward.

With activation checkpointing, the only tensors saved outside the checkpointed layers are each
layer's inputs (``torch.utils.checkpoint`` saves them with ordinary ``save_for_backward``), so
offloading then moves exactly the checkpoint boundaries: what stays in memory is one layer's
recomputed activations at a time.
"""

from __future__ import annotations

import os
import tempfile
import types
import weakref
from typing import Any

import torch
from torch import nn

from tinytune.config import ConfigError

OFFLOAD_MODES = ("pinned", "disk")
DEFAULT_MIN_BYTES = 1 << 20  # smaller tensors are not worth a copy (or a file)
_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def offload_mode(setting: bool | str, device: torch.device) -> str | None:
    """Maps the ``activation_offloading`` setting to a mode for ``device`` (None: off).

    Raises:
        ConfigError: ``true`` on a device without a separate host memory (CPU, MPS): offloading to
            the memory the tensors already live in would do nothing; ``disk`` is the CPU choice.
    """
    if setting is False or setting is None:
        return None
    if setting == "disk":
        return "disk"
    if setting is True:
        if device.type != "cuda":
            raise ConfigError(
                f"activation_offloading: true copies saved activations to pinned host memory, which needs "
                f"a CUDA device (this run is on {device.type}, where they already live in host memory); "
                "use activation_offloading: disk to move them to a temporary file, or false"
            )
        return "pinned"
    raise ConfigError(f"activation_offloading: {setting!r} is not one of false, true, disk")


# ------------------------------------------------------------------------------ stored storages


class _StorageRef:
    """A weak reference to a tensor storage, hashable by its identity (keeps the storage's
    control block, not its memory, so an address is never reused while the reference exists)."""

    __slots__ = ("cdata",)

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.cdata = storage._weak_ref()

    def expired(self) -> bool:
        return torch.UntypedStorage._expired(self.cdata)

    def __del__(self) -> None:
        torch.UntypedStorage._free_weak_ref(self.cdata)

    def __hash__(self) -> int:
        return self.cdata

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StorageRef) and self.cdata == other.cdata


class _Stored:
    """One offloaded storage: its bytes away from compute memory, restored on demand.

    After a restore the restored tensor is kept through a weak reference only, so every saved view
    of the storage unpacked while it is alive shares one copy, and the copy dies with its users.
    """

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self._restored: weakref.ref | None = None

    def get(self) -> torch.Tensor:
        """The storage's bytes on the compute device, as a flat ``uint8`` tensor ``[nbytes]``."""
        flat = self._restored() if self._restored is not None else None
        if flat is None:
            flat = self._load()
            self._restored = weakref.ref(flat)
        return flat

    def _load(self) -> torch.Tensor:
        raise NotImplementedError


class _DiskStored(_Stored):
    """The bytes in an unlinked temporary file (deleted by the OS when this object is freed)."""

    def __init__(self, flat: torch.Tensor, directory: str, stats: OffloadStats) -> None:
        super().__init__(flat.device, flat.numel())
        self._stats = stats
        self._file = None
        host = flat.cpu()  # [nbytes] uint8 (no copy on CPU)
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - lives as long as the saved tensor
        view = memoryview(host.numpy())
        done = 0
        while done < len(view):
            done += os.write(self._file.fileno(), view[done:])
        stats.add(self.nbytes)

    def _load(self) -> torch.Tensor:
        out = torch.empty(self.nbytes, dtype=torch.uint8)  # [nbytes]
        view = memoryview(out.numpy())
        done = 0
        while done < self.nbytes:
            n = os.preadv(self._file.fileno(), [view[done:]], done)
            if n <= 0:
                raise RuntimeError(
                    f"activation offloading: short read from {self._file.name} ({done} of {self.nbytes})"
                )
            done += n
        self._stats.restored += self.nbytes
        return out if self.device.type == "cpu" else out.to(self.device)

    def __del__(self) -> None:
        if self._file is not None:
            self._stats.drop(self.nbytes)
            self._file.close()


class _PinnedStored(_Stored):
    """The bytes in page-locked host memory, copied on a side stream in both directions."""

    def __init__(self, flat: torch.Tensor, streams: _Streams, stats: OffloadStats) -> None:
        super().__init__(flat.device, flat.numel())
        self._stats = stats
        self._counted = False
        self._streams = streams
        self._host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)  # [nbytes]
        side = streams.side
        side.wait_stream(torch.cuda.current_stream(flat.device))  # flat is computed
        with torch.cuda.stream(side):
            self._host.copy_(flat, non_blocking=True)
        # the allocator must not hand flat's block to the compute stream before the copy has read it
        flat.record_stream(side)
        self._d2h = side.record_event()
        self._ready: tuple[torch.Tensor, torch.cuda.Event] | None = None
        stats.add(self.nbytes)
        self._counted = True

    def prefetch(self) -> None:
        """Starts the copy back to the device on the side stream (once)."""
        if self._ready is not None or (self._restored is not None and self._restored() is not None):
            return
        compute = torch.cuda.current_stream(self.device)
        out = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)  # allocated on compute
        side = self._streams.side
        side.wait_stream(compute)  # the block is free on the compute stream
        side.wait_event(self._d2h)  # the host copy is complete
        with torch.cuda.stream(side):
            out.copy_(self._host, non_blocking=True)
        out.record_stream(side)
        self._ready = (out, side.record_event())

    def _load(self) -> torch.Tensor:
        self.prefetch()
        out, event = self._ready
        self._ready = None  # the device copy is owned by its users from here on
        torch.cuda.current_stream(self.device).wait_event(event)
        self._stats.restored += self.nbytes
        return out

    def __del__(self) -> None:
        if self._counted:
            self._stats.drop(self.nbytes)


class _Streams:
    """The side stream of one device, and the packed storages in pack order (weakly held)."""

    def __init__(self, device: torch.device, prefetch: int) -> None:
        self.side = torch.cuda.Stream(device)
        self.prefetch = prefetch
        self.order: list[weakref.ref] = []

    def prefetch_before(self, index: int) -> None:
        """Backward runs in reverse pack order: start restoring the ``prefetch`` storages before ``index``."""
        for ref in self.order[max(0, index - self.prefetch) : index][::-1]:
            stored = ref()
            if stored is not None:
                stored.prefetch()


class OffloadStats:
    """Byte counters shared by one offloader's stored tensors.

    Attributes:
        live: bytes offloaded now (stored away and not yet freed).
        peak: the largest ``live`` seen.
        total: bytes offloaded since creation.
        restored: bytes brought back by backward.
    """

    def __init__(self) -> None:
        self.live = self.peak = self.total = self.restored = 0

    def add(self, n: int) -> None:
        self.live += n
        self.total += n
        self.peak = max(self.peak, self.live)

    def drop(self, n: int) -> None:
        self.live -= n


# ------------------------------------------------------------------------------ the hooks


class ActivationOffloader(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: tensors saved for backward inside it are offloaded (see the module doc).

    Args:
        mode: ``"pinned"`` (CUDA -> page-locked host memory) or ``"disk"`` (temporary files).
        keep: modules whose parameters and buffers are never offloaded (nor any tensor sharing
            storage with them, e.g. a transposed weight).
        offload_dir: directory for ``disk`` (default: the system temporary directory).
        min_bytes: tensors smaller than this (bytes of their storage) stay in place.
        prefetch: ``pinned``: storages restored ahead of backward's request.
        stats: counters to update (a fresh :class:`OffloadStats` by default).

    Example:
        >>> with ActivationOffloader("disk", keep=[model], offload_dir="/scratch"):
        ...     loss = loss_fn(model(tokens))
        >>> loss.backward()   # the saved tensors come back from disk here
    """

    def __init__(
        self,
        mode: str,
        keep: tuple[nn.Module, ...] | list[nn.Module] = (),
        offload_dir: str | None = None,
        min_bytes: int = DEFAULT_MIN_BYTES,
        prefetch: int = 2,
        stats: OffloadStats | None = None,
    ) -> None:
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"activation offloading: mode {mode!r} is not one of {list(OFFLOAD_MODES)}")
        self.mode = mode
        self.min_bytes = int(min_bytes)
        self.offload_dir = offload_dir or tempfile.gettempdir()
        self.stats = stats if stats is not None else OffloadStats()
        self._prefetch = prefetch
        self._keep_ptrs = {
            t.untyped_storage().data_ptr()
            for m in keep
            for t in (*m.parameters(), *m.buffers())
            if type(t) in _PLAIN_TYPES and t.device.type != "meta"
        }
        self._by_storage: dict[_StorageRef, tuple[int, _Stored]] = {}
        self._streams: dict[torch.device, _Streams] = {}
        super().__init__(self._pack, self._unpack)

    def _offloadable(self, t: torch.Tensor) -> bool:
        if type(t) not in _PLAIN_TYPES or isinstance(t, nn.Parameter) or t.layout != torch.strided:
            return False
        if t.device.type == "meta" or (self.mode == "pinned" and t.device.type != "cuda"):
            return False
        storage = t.untyped_storage()
        return storage.nbytes() >= self.min_bytes and storage.data_ptr() not in self._keep_ptrs

    def _store(self, flat: torch.Tensor) -> _Stored:
        if self.mode == "disk":
            return _DiskStored(flat, self.offload_dir, self.stats)
        streams = self._streams.get(flat.device)
        if streams is None:
            streams = self._streams[flat.device] = _Streams(flat.device, self._prefetch)
        stored = _PinnedStored(flat, streams, self.stats)
        stored.index = len(streams.order)
        streams.order.append(weakref.ref(stored))
        return stored

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._offloadable(t):
            return t
        storage = t.untyped_storage()
        key = _StorageRef(storage)
        hit = self._by_storage.get(key)
        if hit is not None and hit[0] == t._version and not key.expired():
            stored = hit[1]
        else:
            flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)  # [nbytes] same memory
            stored = self._store(flat)
            self._by_storage[key] = (t._version, stored)
        return (stored, t.dtype, t.shape, t.stride(), t.storage_offset())

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        stored, dtype, shape, stride, offset = packed
        if isinstance(stored, _PinnedStored):
            stored._streams.prefetch_before(stored.index)
        flat = stored.get()  # [nbytes] uint8 on the compute device
        return torch.empty(0, dtype=dtype, device=flat.device).set_(flat.untyped_storage(), offset, shape, stride)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._by_storage.clear()  # the stored tensors live on in the autograd graph only


# ------------------------------------------------------------------------------ on a model


def _offloaded_forward(self, *args, **kwargs):
    inner = self._tinytune_offload_inner
    if not (self.training and torch.is_grad_enabled()):
        return inner(*args, **kwargs)
    mode, offload_dir, min_bytes = self._tinytune_offload
    with ActivationOffloader(mode, keep=[self], offload_dir=offload_dir, min_bytes=min_bytes):
        return inner(*args, **kwargs)


def apply_activation_offloading(
    model: nn.Module,
    setting: bool | str,
    device: torch.device,
    offload_dir: str | None = None,
    min_bytes: int | None = None,
) -> str | None:
    """Offloads the tensors ``model``'s forward saves for backward (training forwards with grad only).

    ``model.forward`` is replaced per instance by one that runs the original inside an
    :class:`ActivationOffloader` (parameters and buffers of ``model`` kept in place); evaluation
    and ``no_grad`` forwards run unchanged. Combine with :func:`apply_activation_checkpointing`
    (either order) to offload only the per-layer checkpoint inputs.

    Args:
        model: the model whose forward to wrap.
        setting: ``activation_offloading``: false (nothing happens), true (pinned host memory,
            CUDA only) or ``"disk"``.
        device: the training device.
        offload_dir: directory for ``disk`` (created if missing; default: the system temp dir).
        min_bytes: tensors smaller than this stay in place (default: ``DEFAULT_MIN_BYTES``, 1 MiB).

    Returns:
        The mode in use (``"pinned"``, ``"disk"``) or None.

    Raises:
        ConfigError: ``true`` on a device other than CUDA, or an unknown setting.
    """
    mode = offload_mode(setting, device)
    if mode is None:
        return None
    if offload_dir is not None:
        os.makedirs(offload_dir, exist_ok=True)
    if not getattr(model, "_tinytune_offload", None):
        # The instance's current forward (a checkpointing wrapper, or the class's) runs inside.
        model._tinytune_offload_inner = model.forward
        model.forward = types.MethodType(_offloaded_forward, model)
    model._tinytune_offload = (mode, offload_dir, DEFAULT_MIN_BYTES if min_bytes is None else int(min_bytes))
    return mode
