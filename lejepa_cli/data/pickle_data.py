"""Read plain data out of a pickle stream without running it.

    batch = read_pickled_data(Path("cifar-10-batches-py/data_batch_1"))
    batch[b"data"]  # (10000, 3072) uint8 ndarray, batch[b"labels"]: list of int

`pickle.load` executes whatever the file names (any importable callable, with any arguments), so
this tool never calls it on a file a user may have received from someone else. Some standard
datasets ship only as pickles, though (the CIFAR "python version" batches, which torchvision and
most tutorials download). This module interprets the pickle opcodes itself, with
`pickletools.genops` as the parser, and builds only inert values: None, bools, ints, floats, str,
bytes, tuples, lists, dicts and numeric numpy arrays. A stream that names any other callable stops
with `UnsafePickle`; nothing in it is ever imported or called.

The callables a numpy array's pickle names are recognised, not called: numpy's `_reconstruct` +
`dtype` + BUILD states (protocols 0-4), `_frombuffer` (protocol 5, in-band), and `_codecs.encode`
and `bytes()`, through which Python 3 writes bytes at protocols 0-2. The array is rebuilt with
`np.frombuffer` from its raw bytes, for bool, integer, float and complex dtypes only (object
arrays would be pickles again). Python 2 `str` values come back as bytes, as
`pickle.load(f, encoding="bytes")` gives them.
"""

from __future__ import annotations

import io
import math
import pickletools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.errors import UserError


class UnsafePickle(UserError):
    """The stream holds something other than plain data (or is not a pickle at all)."""


# The only callables a stream may name, by (module, name): what each stands for.
_RECONSTRUCT, _NDARRAY, _DTYPE, _FROMBUFFER, _ENCODE, _BYTES = "reconstruct", "ndarray", "dtype", "frombuffer", "encode", "bytes"
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _ENCODE,
    ("__builtin__", "bytes"): _BYTES,  # bytes(): empty bytes at protocols 0-2
    ("builtins", "bytes"): _BYTES,
}
_NUMERIC_KINDS = set("biufc")  # bool, signed, unsigned, float, complex


class _Global:
    """A callable of `_ALLOWED`, by its role: a name to match in REDUCE, never the callable itself."""

    def __init__(self, role: str) -> None:
        self.role = role


class _ArrayPending:
    """numpy `_reconstruct(ndarray, (0,), b'b')`: an empty array until BUILD gives its state."""

    array: np.ndarray | None = None


class _DtypePending:
    """numpy `dtype(typestr, ...)`: native byte order until BUILD gives the stored one."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _MarkStack:
    """Opcode stack with pickle's MARK frames."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.frames: list[list[Any]] = []

    def mark(self) -> None:
        self.frames.append(self.stack)
        self.stack = []

    def pop_mark(self) -> list[Any]:
        if not self.frames:
            raise UnsafePickle("malformed pickle: no MARK")
        items, self.stack = self.stack, self.frames.pop()
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise UnsafePickle("malformed pickle: stack underflow")
        return self.stack.pop()


def read_pickled_data(path: Path) -> Any:
    """The value pickled in `path`, if it is plain data (see the module docstring); else UnsafePickle."""
    # From memory, not the file: an opcode claiming an 8-byte length would make a file object
    # allocate that much before finding the end; BytesIO returns what is there.
    stream = io.BytesIO(path.read_bytes())
    try:
        with warnings.catch_warnings():  # genops warns on bad escapes in protocol-0 strings
            warnings.simplefilter("ignore", DeprecationWarning)
            return _run(stream)
    except UnsafePickle as e:
        raise UnsafePickle(f"{path}: {e}") from None
    except (ValueError, EOFError, KeyError, IndexError, TypeError, RecursionError) as e:  # what genops raises on damaged input
        raise UnsafePickle(f"{path}: not a readable pickle ({e})") from None


def _run(f) -> Any:
    s = _MarkStack()
    memo: dict[int, Any] = {}
    for op, arg, _pos in pickletools.genops(f):
        code = op.name
        if code in ("PROTO", "FRAME"):
            continue
        if code == "STOP":
            value = s.pop()
            return _finished(value)
        if code == "MARK":
            s.mark()
        elif code in ("NONE", "NEWTRUE", "NEWFALSE"):
            s.stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[code])
        elif code in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"):
            s.stack.append(arg)  # genops decodes these (INT gives True/False for protocol 0's 01/00)
        elif code in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"):
            s.stack.append(arg)
        elif code in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
            s.stack.append(bytes(arg))
        elif code == "BYTEARRAY8":
            s.stack.append(bytearray(arg))
        elif code in ("STRING", "BINSTRING", "SHORT_BINSTRING"):  # Python 2 str: bytes, as encoding="bytes"
            s.stack.append(arg.encode("latin-1") if isinstance(arg, str) else bytes(arg))
        elif code == "EMPTY_DICT":
            s.stack.append({})
        elif code == "EMPTY_LIST":
            s.stack.append([])
        elif code == "EMPTY_TUPLE":
            s.stack.append(())
        elif code in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(code[-1])
            if len(s.stack) < k:
                raise UnsafePickle("malformed pickle: stack underflow")
            items = tuple(s.stack[-k:])
            del s.stack[-k:]
            s.stack.append(items)
        elif code in ("TUPLE", "LIST", "DICT"):
            items = s.pop_mark()  # before touching s.stack: popping the mark swaps it
            s.stack.append({"TUPLE": tuple, "LIST": list, "DICT": lambda i: _pairs({}, i)}[code](items))
        elif code == "APPEND":
            value = s.pop()
            _target(s, list).append(value)
        elif code == "APPENDS":
            items = s.pop_mark()
            _target(s, list).extend(items)
        elif code == "SETITEM":
            value, key = s.pop(), s.pop()
            _pairs(_target(s, dict), [key, value])
        elif code == "SETITEMS":
            items = s.pop_mark()
            _pairs(_target(s, dict), items)
        elif code in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = s.stack[-1] if s.stack else _underflow()
        elif code == "MEMOIZE":
            memo[len(memo)] = s.stack[-1] if s.stack else _underflow()
        elif code in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in memo:
                raise UnsafePickle(f"malformed pickle: memo key {arg} unset")
            s.stack.append(memo[int(arg)])
        elif code == "GLOBAL":
            module, _, attr = arg.partition(" ")
            s.stack.append(_global(module, attr))
        elif code == "STACK_GLOBAL":
            attr, module = s.pop(), s.pop()
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise UnsafePickle("malformed pickle: STACK_GLOBAL needs two strings")
            s.stack.append(_global(module, attr))
        elif code == "REDUCE":
            args, fn = s.pop(), s.pop()
            s.stack.append(_reduce(fn, args))
        elif code == "BUILD":
            state = s.pop()
            _build(s.stack[-1] if s.stack else _underflow(), state)
        else:  # NEWOBJ, INST, OBJ, PERSID, EXT*, sets, NEXT_BUFFER, ...: never needed by plain data
            raise UnsafePickle(f"refusing pickle opcode {code} (this reader takes plain data only)")
    raise UnsafePickle("malformed pickle: no STOP")


def _underflow() -> Any:
    raise UnsafePickle("malformed pickle: stack underflow")


def _target(s: _MarkStack, kind: type) -> Any:
    if not s.stack or not isinstance(s.stack[-1], kind):
        raise UnsafePickle(f"malformed pickle: expected a {kind.__name__} on the stack")
    return s.stack[-1]


def _pairs(d: dict, items: list[Any]) -> dict:
    if len(items) % 2:
        raise UnsafePickle("malformed pickle: odd number of dict items")
    for key, value in zip(items[::2], items[1::2]):
        try:
            d[key] = value
        except TypeError:
            raise UnsafePickle(f"refusing an unhashable dict key of type {type(key).__name__}") from None
    return d


def _global(module: str, attr: str) -> _Global:
    role = _ALLOWED.get((module, attr))
    if role is None:
        raise UnsafePickle(f"refusing to load {module}.{attr}: this reader takes plain data (numbers, text, lists, dicts, numeric arrays) only")
    return _Global(role)


def _reduce(fn: Any, args: Any) -> Any:
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        raise UnsafePickle("malformed pickle: REDUCE of something that is not an allowed callable")
    if fn.role == _ENCODE:  # _codecs.encode(text, "latin1"): how Python 3 pickles bytes at protocol <= 2
        if len(args) == 1 and isinstance(args[0], str):
            args = (args[0], "utf-8")
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1", "utf-8", "utf8"):
            raise UnsafePickle("refusing _codecs.encode with arguments other than (text, 'latin1')")
        return args[0].encode(args[1])
    if fn.role == _BYTES:
        if args:
            raise UnsafePickle("refusing bytes() with arguments")
        return b""
    if fn.role == _DTYPE:  # dtype(typestr, align, copy); byte order comes with BUILD
        typestr = args[0].decode("ascii", "replace") if args and isinstance(args[0], bytes) else args[0] if args else None
        if not isinstance(typestr, str):  # (Python 2 pickles give it as bytes)
            raise UnsafePickle("malformed numpy dtype in pickle")
        return _DtypePending(_dtype(typestr))
    if fn.role == _RECONSTRUCT:  # _reconstruct(ndarray, (0,), b'b'): the state follows in BUILD
        if not args or not isinstance(args[0], _Global) or args[0].role != _NDARRAY:
            raise UnsafePickle("refusing numpy _reconstruct of anything but a plain ndarray")
        return _ArrayPending()
    if fn.role == _FROMBUFFER:  # _frombuffer(buffer, dtype, shape, order): protocol 5
        if len(args) != 4 or not isinstance(args[1], _DtypePending):
            raise UnsafePickle("malformed numpy _frombuffer in pickle")
        return _array(args[0], args[1], args[2], args[3] == "F")
    raise UnsafePickle(f"refusing to call {fn.role}")


def _dtype(typestr: str) -> np.dtype:
    try:
        dtype = np.dtype(typestr)
    except TypeError:
        raise UnsafePickle(f"refusing numpy dtype {typestr!r}") from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickle(f"refusing numpy dtype {typestr!r}: only bool, integer, float and complex arrays are read")
    return dtype


def _build(target: Any, state: Any) -> None:
    if isinstance(target, _DtypePending):
        # dtype state: (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5):
            raise UnsafePickle("malformed numpy dtype state in pickle")
        if state[2] is not None or state[3] is not None or state[4] is not None:
            raise UnsafePickle("refusing a structured or sub-array numpy dtype")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order in ("<", ">"):
            target.dtype = target.dtype.newbyteorder(order)
        return
    if isinstance(target, _ArrayPending):
        # ndarray state: (version, shape, dtype, is_fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickle("malformed numpy array state in pickle")
        _version, shape, dtype, fortran, raw = state
        target.array = _array(raw, dtype, shape, bool(fortran))
        return
    raise UnsafePickle(f"refusing to BUILD a {type(target).__name__}")


def _array(raw: Any, pending_dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    if not isinstance(pending_dtype, _DtypePending):
        raise UnsafePickle("malformed numpy array: no dtype")
    dtype = pending_dtype.dtype
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickle("refusing a numpy array whose data is not raw bytes (object arrays are not read)")
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise UnsafePickle("malformed numpy array shape in pickle")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise UnsafePickle(f"numpy array of shape {shape} {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, the pickle holds {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _finished(value: Any, done: dict[int, Any] | None = None) -> Any:
    """Swap every pending array for the array its BUILD made (they nest inside containers).

    `done` maps id(container) -> its finished copy, so a value shared through the memo is walked
    once and stays shared: a stream of n lists each holding the previous one twice stays O(n),
    not 2^n, and self-referencing lists do not loop.
    """
    done = {} if done is None else done
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, _ArrayPending):
        if value.array is None:
            raise UnsafePickle("malformed pickle: numpy array without its state")
        return value.array
    if isinstance(value, _DtypePending):
        return value.dtype
    if isinstance(value, _Global):
        raise UnsafePickle("refusing a pickle whose value is a callable")
    out: Any
    if isinstance(value, list):
        out = done[id(value)] = []
        out.extend(_finished(v, done) for v in value)
    elif isinstance(value, dict):
        out = done[id(value)] = {}
        for k, v in value.items():
            _pairs(out, [_finished(k, done), _finished(v, done)])
    elif isinstance(value, tuple):
        out = done[id(value)] = tuple(_finished(v, done) for v in value)
    else:
        out = value
    return out
