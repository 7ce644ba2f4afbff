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


class UnsafeCheckpointError(ValueError):
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
    return _restricted(path, path, mmap)


def _restricted(source, where: str, mmap: bool = False):
    """``torch.load(source, weights_only=True)`` with the allowlist; a refusal names ``where`` and the global."""
    import torch

    try:
        with torch.serialization.safe_globals(allowlist()):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{where}: refusing to load this checkpoint: it asks for code or types that a Composer checkpoint never "
            f"holds ({_detail(exc)})"
        ) from exc


def check(path: str) -> None:
    """Raise ``UnsafeCheckpointError`` unless the checkpoint (a ``.pt`` file or a sharded folder) loads safely."""
    if os.path.isdir(path):
        _check_sharded(path)
    else:
        load(path, mmap=True)  # the pickle is read in full; the tensors' bytes are only mapped


class _MetadataUnpickler(pickle.Unpickler):
    """``.metadata`` of torch.distributed.checkpoint: its own dataclasses, torch sizes and dtypes, containers."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
    OTHERS = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # torch.strided and the like, by name
        ("pathlib", "PosixPath"),  # the checkpoint id it was saved under
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str):
        import torch

        if module in self.MODULES:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in self.OTHERS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint's .metadata")


def _check_sharded(folder: str) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(folder, ".metadata")
    try:
        with open(meta_path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError) as exc:
        raise UnsafeCheckpointError(f"{meta_path}: refusing to load this checkpoint's metadata: {exc}") from exc
    byte_items = {fqn for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_items:
            continue
        shard = os.path.join(folder, info.relative_path)
        with open(shard, "rb") as fh:
            fh.seek(info.offset)
            data = fh.read(info.length)
        _restricted(io.BytesIO(data), f"{shard} (item {index.fqn})")


def _detail(exc: Exception) -> str:
    """The line of torch's refusal that names the global or type."""
    lines = [line.strip() for line in str(exc).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "got <" in line or "Unsupported" in line]
    return (named or lines or ["unknown"])[0]
