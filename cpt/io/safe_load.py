"""Checkpoints are never unpickled blindly: ``torch.load(weights_only=True)`` with an explicit allowlist.

A Composer checkpoint (``ep*-ba*-rank0.pt``) holds tensors, plain containers and a few more types: its RNG
state (numpy arrays and dtypes), a ``datetime.timedelta`` in the timestamp and the torch version. Nothing else
is allowed. Composer's resume and most loaders call ``torch.load(weights_only=False)``, which runs whatever a
pickle asks for: cpt checks every checkpoint with the restricted loader first (``check``, memory-mapped, so
the tensors are not read) and hands Composer only files that pass. The same goes for a sharded checkpoint: its
``.metadata`` (a raw pickle) is read with a restricted unpickler, and every non-tensor item of its shards
(torch.distributed.checkpoint stores them as ``torch.save`` bytes) with the restricted loader.

See Composer's "Harden checkpoint deserialization" (mosaicml/composer#3937) for the same idea upstream.
"""

from __future__ import annotations

import datetime
import io
import os
import pickle

from cpt.io import untrusted
from cpt.io.untrusted import UntrustedError


class UnsafeCheckpointError(UntrustedError):
    """A checkpoint whose pickle asks for something a Composer checkpoint never holds; the message names it."""


def allowlist() -> list:
    """The globals a Composer checkpoint may name beyond what ``weights_only`` always allows."""
    import numpy as np
    import torch

    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    dtypes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"]  # numpy.dtypes.UInt32DType and the like
    return [datetime.timedelta, np.dtype, np.ndarray, reconstruct, *dtypes, torch.torch_version.TorchVersion]


def load(path: str, mmap: bool = False):
    """``torch.load`` of a local checkpoint file with ``weights_only=True`` and the allowlist."""
    if not os.path.isfile(path):
        raise UnsafeCheckpointError(f"{path}: not a checkpoint file")
    return _restricted(path, path, mmap)


def _restricted(source, where: str, mmap: bool = False):
    """``torch.load(source, weights_only=True)`` with the allowlist; a refusal names ``where`` and the global.

    Every tensor must fit its storage: a stride-0 tensor that claims a billion elements of a one-element storage
    would be materialised by the first ``.to()``."""
    import torch

    try:
        with torch.serialization.safe_globals(allowlist()):
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{where}: refusing to load this checkpoint: it asks for code or types that a Composer checkpoint never "
            f"holds ({_detail(exc)})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the bytes make the loader raise, it is a refusal
        # an allow-listed constructor that raises (a timedelta out of range, a bad dtype), a truncated file
        raise UnsafeCheckpointError(f"{where}: cannot read this checkpoint: {type(exc).__name__}: {exc}"[:500]) from exc
    _check_tensors(state, where)
    return state


def _check_tensors(value, where: str, path: str = "") -> None:
    """``UnsafeCheckpointError`` for a tensor that claims more elements than its storage holds."""
    import torch

    stack = [(path, value)]
    while stack:
        here, item = stack.pop()
        if isinstance(item, torch.Tensor):
            need = item.numel() * item.element_size()
            have = item.untyped_storage().nbytes() - item.storage_offset() * item.element_size()
            if need > have:
                raise UnsafeCheckpointError(
                    f"{where}: tensor {here or '<root>'} claims {need:,} bytes ({tuple(item.shape)}, strides "
                    f"{item.stride()}) over a storage of {have:,}: refusing it"
                )
        elif isinstance(item, dict):
            stack.extend((f"{here}.{k}" if here else str(k), v) for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((f"{here}[{i}]", v) for i, v in enumerate(item))


def check(path: str) -> None:
    """Raise ``UnsafeCheckpointError`` unless the checkpoint (a ``.pt`` file or a sharded folder) loads safely."""
    if os.path.isdir(path):
        _check_sharded(path)
    else:
        load(path, mmap=True)  # the pickle is read in full; the tensors' bytes are only mapped


class _MetadataUnpickler(pickle.Unpickler):
    """``.metadata`` of torch.distributed.checkpoint: its own dataclasses, torch sizes and dtypes, containers.

    Exact ``(module, name)`` pairs only. A dotted name (protocol 4's ``STACK_GLOBAL`` with
    ``torch.distributed.checkpoint.metadata`` + ``os.system``) would reach any module through the allowed one's
    imports, so it is refused before ``find_class`` of pickle resolves it."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",  # an Enum of memory formats
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # torch.strided and the like, by name
        ("torch", "Size"),
        ("pathlib", "PosixPath"),  # the checkpoint id it was saved under
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str):
        import torch

        ok = (module, name) in self.ALLOWED
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            ok = True
        if not ok or "." in name:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint's .metadata")
        return super().find_class(module, name)


def _check_sharded(folder: str) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(folder, ".metadata")
    _regular(meta_path, meta_path)
    try:
        with open(meta_path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except Exception as exc:  # noqa: BLE001 - whatever the bytes make the unpickler raise, it is a refusal
        raise UnsafeCheckpointError(f"{meta_path}: refusing to load this checkpoint's metadata: {exc}"[:500]) from exc
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{meta_path}: not torch.distributed.checkpoint metadata")
    byte_items = {fqn for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        # every item is a direct child file of the folder, and its bytes lie within that file
        name = getattr(info, "relative_path", None)
        where = f"{meta_path}: item {getattr(index, 'fqn', index)}"
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or "\\" in name or "\0" in name:
            raise UnsafeCheckpointError(f"{where}: relative_path {name!r} is not a file of this checkpoint folder")
        shard = os.path.join(folder, name)
        if name not in sizes:
            sizes[name] = _regular(shard, where)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise UnsafeCheckpointError(f"{where}: offset and length must be non-negative integers")
        if offset + length > sizes[name]:
            raise UnsafeCheckpointError(
                f"{where}: bytes {offset}..{offset + length} lie outside {name} ({sizes[name]:,} bytes)"
            )
        if index.fqn not in byte_items:
            continue
        with open(shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        _restricted(io.BytesIO(data), f"{shard} (item {index.fqn})")


def _regular(path: str, where: str) -> int:
    try:
        return untrusted.regular(path, where)
    except untrusted.UntrustedError as exc:
        raise UnsafeCheckpointError(str(exc)) from None


def _detail(exc: Exception) -> str:
    """The line of torch's refusal that names the global or type."""
    lines = [line.strip() for line in str(exc).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "got <" in line or "Unsupported" in line]
    return (named or lines or ["unknown"])[0]
