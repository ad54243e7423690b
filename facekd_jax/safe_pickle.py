"""Pickles from outside (insightface `.bin` files, torch.save archives): checked before they are unpickled, and the
NumPy arrays in them rebuilt from data alone.

Both readers restrict the globals a pickle may name (their find_class), so nothing in a file runs. That leaves two
ways a damaged file still hurts, both found by the fuzz harness (tests/fuzzing.py):
- the C unpickler trusts sizes: it allocates the length a BINBYTES8 or BINUNICODE8 declares before reading it, and
  grows its memo to the largest slot a PUT names, so a few flipped bits in a 10 kB file ask for gigabytes.
  `scan` walks the opcodes with pickletools first (pure Python: it reads what is there, never what is declared)
  and refuses, naming the byte, a length past the end of the data, a memo slot the pickle cannot have made yet and
  an opcode across the end of its frame;
- NumPy's own reconstruction (numpy.dtype's __setstate__, _reconstruct) trusts the state it is given: a damaged
  dtype state crashed the interpreter (SIGSEGV in NumPy's clear loop). `NUMPY_GLOBALS` stand in for those globals
  and build plain arrays of a few fixed dtypes with np.frombuffer (`resolve` turns the stand-ins into arrays).
"""
from __future__ import annotations

import pickletools
import struct
from typing import Any

import numpy as np


def scan(data: bytes, what: str) -> None:
    """Walks the pickle's opcodes (pickletools builds nothing) before an unpickler runs: every length must fit in
    the bytes left, every memo index must be one the pickle could have made so far, and no opcode may straddle the
    end of a frame. The C unpickler allocates the length an opcode declares (2**40 bytes), grows its memo to an
    index (2**32 slots), or, reading from a file, asks for gigabytes across a frame's end, before it finds the data
    short. ValueError "WHAT: at byte N: why" when one does."""
    pos, last, frame_end = 0, 0, 0
    try:
        for n, (op, arg, pos) in enumerate(pickletools.genops(data)):
            if pos > frame_end > last:
                raise ValueError(f"the opcode at byte {last} runs past the end of its frame at byte {frame_end}")
            last = pos
            if op.name == "FRAME":
                if arg > len(data) - pos - 9:
                    raise ValueError(f"a frame of {arg} bytes with {len(data) - pos - 9} left")
                frame_end = pos + 9 + arg
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > n:
                raise ValueError(f"memo index {arg} after {n} opcodes")
    except (ValueError, struct.error) as e:
        raise ValueError(f"{what}: at byte {pos}: {e}") from None


# NumPy's pickled arrays: ndarray via _reconstruct (+ __setstate__), dtypes via numpy.dtype (+ __setstate__),
# scalars via numpy.core.multiarray.scalar. Only these kinds, of at most 8 bytes, are rebuilt; anything else is
# refused as a damaged or foreign file.
_KINDS = "biuf"


class _Dtype:
    """numpy.dtype(spec, align, copy) and its __setstate__, checked: a plain number type, nothing else."""

    def __init__(self, spec: Any = None, align: Any = 0, copy: Any = 0):
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if isinstance(spec, type) and issubclass(spec, np.generic):
            spec = np.dtype(spec).str
        if not isinstance(spec, str) or len(spec) > 4:
            raise ValueError(f"a dtype spec {spec!r:.40} that is not a short type code")
        try:
            dtype = np.dtype(spec)
        except TypeError:
            raise ValueError(f"an unknown dtype {spec!r}") from None
        if dtype.kind not in _KINDS or dtype.itemsize > 8:
            raise ValueError(f"a dtype {dtype.str} that is not a plain bool, integer or float")
        self.dtype = dtype

    def __setstate__(self, state) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise ValueError(f"a dtype state {state!r:.80} of an unknown layout")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5]) \
                or state[5] not in (-1, self.dtype.itemsize) or state[7] != 0:
            raise ValueError(f"a dtype state {state!r:.80} that is not a plain number type")
        self.dtype = self.dtype.newbyteorder(order if order in "<>" else "=")


class _Array:
    """numpy.core.multiarray._reconstruct(ndarray, shape, dtype) and ndarray.__setstate__, rebuilt by
    np.frombuffer from the pickled bytes; `resolve` swaps it for the array."""

    def __init__(self, cls: Any = None, shape: Any = (0,), dtype: Any = b"b"):
        self.array = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError(f"an array state {state!r:.80} of an unknown layout")
        _, shape, dtype, fortran, raw = state
        if isinstance(shape, int):
            shape = (shape,)
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ValueError(f"an array shape {shape!r:.80}")
        if not isinstance(dtype, _Dtype):
            raise ValueError(f"an array of {type(dtype).__name__}, not a dtype")
        if isinstance(raw, str):
            raw = raw.encode("latin1")  # Python 2 pickles read with encoding="latin1"
        if not isinstance(raw, (bytes, bytearray)):
            raise ValueError(f"array data of type {type(raw).__name__}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.dtype.itemsize != len(raw):
            raise ValueError(f"an array of shape {shape} and dtype {dtype.dtype.str} holding {len(raw)} bytes")
        self.array = np.frombuffer(bytes(raw), dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _frombuffer(raw: Any, dtype: Any, shape: Any, order: Any = "C") -> _Array:
    """numpy._core.numeric._frombuffer: how protocol 5 pickles a contiguous array."""
    out = _Array()
    out.__setstate__((1, shape, dtype, order == "F", bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw))
    return out


def _scalar(dtype: Any, raw: Any = b"") -> Any:
    if not isinstance(dtype, _Dtype):
        raise ValueError(f"a scalar of {type(dtype).__name__}, not a dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise ValueError(f"a {dtype.dtype.str} scalar of {len(raw) if isinstance(raw, bytes) else '?'} bytes")
    return np.frombuffer(raw, dtype=dtype.dtype)[0]


# What find_class returns for NumPy's names (numpy.core / numpy._core, multiarray / numeric).
NUMPY_GLOBALS = {"_reconstruct": _Array, "ndarray": _Array, "dtype": _Dtype, "scalar": _scalar, "_frombuffer": _frombuffer,
                 "bool_": np.bool_, "bool": np.bool_, "uint8": np.uint8}


def resolve(obj: Any, depth: int = 0) -> Any:
    """`obj` with the array stand-ins replaced by their arrays, through lists, tuples and dicts."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise ValueError("an array whose state was never given")
        return obj.array
    if isinstance(obj, _Dtype):
        return obj.dtype
    if depth > 4:
        return obj
    if isinstance(obj, list):
        return [resolve(x, depth + 1) for x in obj]
    if isinstance(obj, tuple):
        return tuple(resolve(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return type(obj)((k, resolve(v, depth + 1)) for k, v in obj.items())
    return obj
