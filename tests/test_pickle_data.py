"""pickle_data: plain data out of pickles without running them (oracle: pickle.loads on our own files)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

from data_fixtures import make_cifar10_python, py2_pickle
from lejepa_cli.data.pickle_data import UnsafePickle, read_pickled_data

PLAIN = {
    "uint8": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    b"labels": [1, 2, 3],
    "big-endian": (np.arange(5) / 4).astype(">f8"),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
    "scalars": (1, -5, 2**70, -(2**40), 3.5, float("inf"), None, True, False, "é", b"\x00\xff", (), b""),
    "nested": [[{"empty": np.zeros((0, 3), np.float32)}]],
    "bool": np.array([True, False]),
    "complex": np.array([1 + 2j], np.complex64),
    "0-d": np.array(3.0),
}


def _same(a, b) -> bool:
    if isinstance(b, np.ndarray):  # byte order may differ (ours keeps the stored one); values may not
        return (isinstance(a, np.ndarray) and a.dtype.kind == b.dtype.kind and a.dtype.itemsize == b.dtype.itemsize
                and a.shape == b.shape and np.array_equal(a, b))
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reads_what_pickle_reads_at_every_protocol(tmp_path, protocol):
    f = tmp_path / "data.pkl"
    f.write_bytes(pickle.dumps(PLAIN, protocol=protocol))
    got = read_pickled_data(f)
    assert _same(got, pickle.loads(f.read_bytes()))
    assert got["big-endian"].dtype == np.dtype(">f8") and got["fortran"].flags.f_contiguous


def test_reads_python2_cifar_batches_as_pickle_does(tmp_path):
    make_cifar10_python(tmp_path, per_batch=5)
    for name in ("data_batch_1", "batches.meta"):
        with warnings.catch_warnings():  # numpy 2 warns about numpy.core in old pickles
            warnings.simplefilter("ignore")
            ref = pickle.loads((tmp_path / name).read_bytes(), encoding="bytes")
        assert _same(read_pickled_data(tmp_path / name), ref)


class _Payload:
    """Unpickling this creates `path`: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_refuses_anything_but_plain_data_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "callable": (pickle.dumps({"data": _Payload(marker)}), "io.open"),
        "os.system": (b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.", "os.system"),
        "object array": (pickle.dumps(np.array([_Payload(marker)], dtype=object)), "dtype 'O"),
        "structured dtype": (pickle.dumps(np.zeros(2, dtype=[("a", "f4")])), "dtype"),
        "set": (pickle.dumps({1, 2}), "EMPTY_SET"),
        "class instance": (pickle.dumps(ValueError("x")), "builtins.ValueError"),
        "garbage": (b"not a pickle", "not a readable pickle"),
        "empty": (b"", "not a readable pickle"),
        "truncated": (pickle.dumps(PLAIN, protocol=2)[:-40], "not a readable pickle"),
        "wrong byte count": (py2_pickle({b"data": np.zeros((1, 300), np.uint8)}).replace(b"T\x2c\x01\x00\x00\x00", b"T\x2b\x01\x00\x00", 1), "needs 300 bytes"),
        "deep nesting": (b"\x80\x02" + b"](" * 100_000 + b"K\x01" + b"e" * 100_000 + b".", None),
    }
    for name, (data, message) in cases.items():
        f = tmp_path / f"{name}.pkl"
        f.write_bytes(data)
        with pytest.raises(UnsafePickle) as info:
            read_pickled_data(f)
        assert str(f) in str(info.value) and "\n" not in str(info.value), name
        assert message is None or message in str(info.value), (name, str(info.value))
    assert not marker.exists()


def test_shared_and_self_referencing_values_stay_linear(tmp_path):
    """60 lists each holding the previous one twice: 2^60 leaves if copied, 61 lists if kept shared."""
    nested = [1]
    for _ in range(60):
        nested = [nested, nested]
    loop: list = []
    loop.append(loop)
    f = tmp_path / "shared.pkl"
    f.write_bytes(pickle.dumps({"nested": nested, "loop": loop}, protocol=2))
    got = read_pickled_data(f)
    assert got["nested"][0] is got["nested"][1] and got["loop"][0] is got["loop"]


def test_damaged_pickles_fail_as_unsafe_pickle_only(tmp_path):
    """Random byte edits of valid pickles: each reads, or fails as UnsafePickle (a one-line error),
    never another exception (lengths claiming exabytes once raised MemoryError)."""
    import random

    bases = [pickle.dumps({"a": np.arange(10, dtype=np.uint8), "b": [1, "x", b"y", 2.5, (None, True)]}, protocol=p)
             for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    bases.append(py2_pickle({b"data": np.zeros((2, 300), np.uint8), b"labels": [1, 2]}))
    rng = random.Random(0)
    f = tmp_path / "damaged.pkl"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(3000):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 4)):
            pos, kind = rng.randrange(len(data)), rng.random()
            if kind < 0.5:
                data[pos] = rng.randrange(256)
            elif kind < 0.75:
                del data[pos : pos + rng.randint(1, 8)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        f.write_bytes(bytes(data))
        try:
            read_pickled_data(f)
            outcomes["read"] += 1
        except UnsafePickle:
            outcomes["refused"] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0
