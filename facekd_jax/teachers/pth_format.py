"""A PyTorch state dict file (`torch.save(model.state_dict(), path)`) read without running anything in it.

    state = read_state_dict("backbone.pth")                   # {"conv1.weight": float32 [64, 3, 3, 3], ...}
    state = read_state_dict("backbone.pth", use_torch=False)  # the same through this module's own reader

Out: {tensor name: numpy array}, in the file's order; floating tensors as float32 (fp16/bf16/fp64 files are
widened or narrowed), integer ones (BatchNorm's num_batches_tracked) as they are. A file holding an arcface_torch
training checkpoint ({"state_dict_backbone": ..., ...}) gives its backbone's state dict.

A .pth is a pickle, and unpickling runs whatever callable the file names. So nothing here unpickles freely:
  - where torch is installed, `torch.load(path, map_location="cpu", weights_only=True)` (torch's own allow-list);
  - otherwise (or with use_torch=False) `read_zip_state_dict`: the zip format torch.save writes since 1.6,
    ARCHIVE/data.pkl + ARCHIVE/data/<key> (+ byteorder, version), unpickled by `_StateDictUnpickler`, whose
    find_class knows only collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter and the
    torch.<Type>Storage names (each answered by a stand-in defined here, never by torch), and whose
    persistent_load turns ('storage', <Type>Storage, key, location, numel) into the bytes of ARCHIVE/data/<key>
    read with NumPy. Any other global (os.system, builtins.eval, ...) stops the read with a PthFormatError naming
    the file and the global, before anything is called.
The legacy format (torch < 1.6, not a zip) is read only through torch; TorchScript archives (torch.jit.save) are
refused (they hold code, not a state dict).
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import zipfile
from typing import Any, Dict, Tuple

import numpy as np

from facekd_jax import safe_pickle

TORCH_HINT = "pip install torch (CPU wheel)"


class PthFormatError(ValueError):
    """The file is not a PyTorch state dict this module can read safely; says which file and why."""


# torch.<Name>Storage -> the NumPy dtype of its elements (little-endian unless the archive says otherwise).
_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _StorageType:
    """Stands in for torch.<Name>Storage inside the pickle: only its element dtype is used."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """One storage of the archive: a flat NumPy array of its elements."""

    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2's arguments -> a NumPy array (a copy) of the view it describes."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor whose storage is {type(storage).__name__}, not a storage record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    flat = storage.data
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise pickle.UnpicklingError(f"storage {storage.key}: a tensor of size {size}, stride {stride}, offset "
                                     f"{storage_offset} is not a view")
    if math.prod(size) > flat.size:  # a zero or overlapping stride: np.array below would copy every repeat
        raise pickle.UnpicklingError(f"storage {storage.key} holds {flat.size} elements; a tensor of size {size}, "
                                     f"stride {stride} repeats them, which a state dict's tensors never do")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= flat.size:
        raise pickle.UnpicklingError(f"storage {storage.key} holds {flat.size} elements; a tensor of size {size}, "
                                     f"stride {stride}, offset {storage_offset} reads past its end")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size, strides=[s * item for s in stride],
                                           writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict's data.pkl; refuses every global a state dict does not need."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: Dict[str, _Storage] = {}
        self.refused: Tuple[str, str] | None = None

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        self.refused = (module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"a persistent id {pid!r:.80} that is not a storage record")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            entry = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(entry)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key}: the archive has no {entry}") from None
            code = _STORAGE_DTYPES[storage_type.name]
            if code == "bfloat16":
                import ml_dtypes  # JAX's dependency: NumPy has no bfloat16 of its own
                dtype = np.dtype(ml_dtypes.bfloat16)
            else:
                dtype = np.dtype(code).newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) < int(numel) * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key}: {entry} has {len(raw)} bytes, {storage_type!r} of "
                                             f"{numel} elements needs {int(numel) * dtype.itemsize}")
            data = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self.storages[key] = _Storage(key, data.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">"
                                          else data)
        return self.storages[key]


def _zip_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The archive's top folder ("archive/", or the saved file's stem) holding data.pkl."""
    names = archive.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise PthFormatError(f"{path}: a TorchScript archive (torch.jit.save), which holds code, not a state dict: "
                             "save the network's state_dict() with torch.save instead")
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise PthFormatError(f"{path}: a zip file but not a torch.save archive (expected one ARCHIVE/data.pkl, "
                             f"found {len(pickles)})")
    # zipfile reads an entry with a buffer of the size the directory declares (up to 2 GiB at a time), so sizes
    # are checked against the file first; 1032:1 is deflate's largest ratio (torch.save stores, never deflates).
    size = os.path.getsize(path)
    for info in archive.infolist():
        if info.compress_size > size or info.file_size > 1032 * max(info.compress_size, 1):
            raise PthFormatError(f"{path}: entry {info.filename} at byte {info.header_offset} declares "
                                 f"{info.file_size} bytes ({info.compress_size} in the archive) in a {size}-byte file")
    return pickles[0][:-len("data.pkl")]


# What zipfile raises on a damaged archive: OSError for a seek to a negative offset a damaged directory names,
# ValueError for one past 2**63 ("cannot fit 'int' into an offset-sized integer"), RuntimeError for an entry whose
# flags say it is encrypted. (A PthFormatError is a ValueError too: the readers re-raise it first.)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, UnicodeDecodeError, NotImplementedError,
               ValueError, RuntimeError)


def read_zip_state_dict(path: "str | os.PathLike") -> Any:
    """The object torch.save pickled in a zip archive, read with the restricted unpickler (tensors as NumPy).

    PthFormatError names the file and, for a refused pickle, the global it names (nothing from the file runs).
    """
    path = os.fspath(path)
    if not is_zip_archive(path):
        raise PthFormatError(f"{path}: not a zip archive: a legacy torch.save file (torch < 1.6) or not a PyTorch "
                             f"file at all; the legacy format is read only through torch ({TORCH_HINT}), or "
                             "re-save it with a current torch: torch.save(torch.load(path, weights_only=True), new)")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _zip_prefix(archive, path)
            try:
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            except KeyError:
                byteorder = "little"  # archives written before torch recorded it are little-endian
            if byteorder not in ("little", "big"):
                raise PthFormatError(f"{path}: {prefix}byteorder says {byteorder!r}, expected 'little' or 'big'")
            raw = archive.read(f"{prefix}data.pkl")
            try:
                safe_pickle.scan(raw, f"{path}: {prefix}data.pkl is not a readable state dict")
            except ValueError as e:
                raise PthFormatError(str(e)) from None
            unpickler = _StateDictUnpickler(raw, archive, prefix, byteorder)
            try:
                return unpickler.load()
            except Exception as e:  # noqa: BLE001 - any failure of a foreign pickle is the file's, said in one line
                if unpickler.refused:
                    module, name = unpickler.refused
                    raise PthFormatError(
                        f"{path}: refused: its pickle names the global {module}.{name}, which a state dict never "
                        "needs (nothing from the file was run; only tensors, storages and OrderedDict are allowed)"
                    ) from None
                raise PthFormatError(f"{path}: {prefix}data.pkl is not a readable state dict ({type(e).__name__}: "
                                     f"{e})") from None
    except PthFormatError:
        raise
    except _ZIP_ERRORS as e:
        raise PthFormatError(f"{path}: a damaged zip archive ({type(e).__name__}: {e})") from None


def is_zip_archive(path: str) -> bool:
    """zipfile.is_zipfile, with a damaged end record (it raises BadZipFile for some) a PthFormatError."""
    try:
        return zipfile.is_zipfile(path)
    except _ZIP_ERRORS as e:
        raise PthFormatError(f"{path}: a damaged zip archive ({type(e).__name__}: {e})") from None


def _torch_load(path: str) -> Any:
    """torch.load with weights_only=True (torch's allow-list), tensors turned into NumPy arrays."""
    import torch

    if is_zip_archive(path):
        try:
            with zipfile.ZipFile(path) as archive:
                _zip_prefix(archive, path)  # refuses a TorchScript archive before torch would run it
        except PthFormatError:
            raise
        except _ZIP_ERRORS as e:
            raise PthFormatError(f"{path}: a damaged zip archive ({type(e).__name__}: {e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message names the refused global ("... unsupported GLOBAL posix.system whose module ..."), after
        # a paragraph of advice to retry with weights_only=False, which is exactly what must not be done here.
        text = str(e)
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and not p.strip().startswith(
            ("Weights only load failed", "Check the documentation"))]
        said = (f"its pickle names the global {found.group(1)}, which a state dict never needs" if found
                else " ".join((paragraphs or [type(e).__name__])[0].split()))
        raise PthFormatError(f"{path}: refused by torch.load(weights_only=True): {said} (nothing from the file "
                             "was run)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PthFormatError(f"{path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}: "
                             f"{first})") from None

    def to_numpy(value):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return (value.to(torch.float32) if value.is_floating_point() else value).numpy()
        if isinstance(value, dict):
            return type(value)((k, to_numpy(v)) for k, v in value.items())
        return value

    return to_numpy(obj)


def torch_installed() -> bool:
    """Whether `import torch` works here (then read_state_dict reads through torch.load by default)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def read_state_dict(path: "str | os.PathLike", *, use_torch: "bool | None" = None) -> Dict[str, np.ndarray]:
    """A state dict file -> {name: NumPy array} (floats as float32), in the file's order.

    use_torch: None = torch.load(weights_only=True) where torch is installed, else the restricted zip reader;
    True / False force one of them. PthFormatError (a ValueError) names the file and what is wrong: a refused
    global, a legacy file without torch, a TorchScript archive, an entry that is not a tensor.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights={path}: no such file")
    obj = _torch_load(path) if (torch_installed() if use_torch is None else use_torch) else read_zip_state_dict(path)
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]  # an arcface_torch training checkpoint (checkpoint_gpu_N.pt)
    if not isinstance(obj, dict):
        raise PthFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    state: Dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise PthFormatError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        state[str(name)] = value
    # Saved from nn.DataParallel / DistributedDataParallel: every name starts with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
