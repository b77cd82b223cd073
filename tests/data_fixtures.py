"""Generators of small test datasets (image folders with bad files, IDX, CIFAR binary and python) and a
local HTTP server with Range support, shared by test_data_prepare.py and test_fetch.py."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import re
import struct
import threading
from pathlib import Path

import numpy as np
from PIL import Image

BAD_FILES = {"a/corrupt.jpg", "a/truncated.png", "b/zero.png", "b/notes.txt"}
RED, BLUE = (230, 20, 20), (20, 20, 230)


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def make_image_folder(root: Path, per_class: int = 70, classes: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Path:
    """Class sub-folders of small JPEG/PNG images plus the awkward cases:

    a/corrupt.jpg (JPEG header then garbage), a/truncated.png (half a PNG), b/zero.png (0 bytes),
    b/notes.txt (text): the four files that must be skipped; and decodable oddities:
    c/cmyk.jpg (CMYK red), c/sixteen.png (16-bit grey 40000), c/rgba.png (left half transparent,
    right half opaque blue), c/exif.jpg (40x20 stored, EXIF orientation 6, red marker, see
    `exif_marker_ok`), plus a hidden .DS_Store that must be ignored.
    """
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            # Mixed sizes and formats; a class-dependent tint so labels are visible in pixels.
            h, w = int(rng.integers(18, 30)), int(rng.integers(18, 30))
            pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            pixels[..., label % 3] += 120
            suffix = ".png" if i % 3 == 0 else ".jpg"
            _save(Image.fromarray(pixels), root / name / f"img{i:03d}{suffix}")
    a, b, c = root / classes[0], root / classes[1], root / classes[2]
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(good, "JPEG")
    (a / "corrupt.jpg").write_bytes(good.getvalue()[:4] + rng.integers(0, 255, 3000, dtype=np.uint8).tobytes())
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (a / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (b / "zero.png").write_bytes(b"")
    (b / "notes.txt").write_text("not an image\n")
    (b / ".DS_Store").write_bytes(b"\0\1\2")
    _save(Image.new("CMYK", (24, 20), (0, 255, 255, 0)), c / "cmyk.jpg", quality=95)
    _save(Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16)), c / "sixteen.png")
    rgba = np.zeros((20, 24, 4), dtype=np.uint8)
    rgba[..., :3] = BLUE
    rgba[:, 12:, 3] = 255  # left half fully transparent
    _save(Image.fromarray(rgba, "RGBA"), c / "rgba.png")
    img, save_kw = exif_image()
    _save(img, c / "exif.jpg", **save_kw)
    return root


def exif_image() -> tuple[Image.Image, dict]:
    """A 40x20 (w x h) blue JPEG with EXIF orientation 6 (display = rotate 90 degrees clockwise).

    Stored marker: x in [12, 20), y in [0, 6). Displayed (20 wide, 40 tall) it sits at
    x' = 19 - y in [14, 20), y' = x in [12, 20): the right edge, inside the centre crop.
    """
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:] = BLUE
    pixels[0:6, 12:20] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    return Image.fromarray(pixels), {"exif": exif.tobytes(), "quality": 95}


def exif_marker_ok(img: np.ndarray) -> bool:
    """At resolution 16 (displayed 20x40 -> centre rows 10..30 -> scale 0.8) the marker lands at
    x in [11.2, 16), y in [1.6, 8); without the rotation it would sit at the top-left instead."""
    def red(p):
        return p[0] > 150 and p[1] < 110 and p[2] < 110

    return red(img[5, 14]) and not red(img[2, 5]) and not red(img[12, 3])


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def make_idx_folder(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 255, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 255, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(root / name, arr)
    return arrays


def py2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2's cPickle writes it at protocol 2 (how the CIFAR python batches
    were made): str as SHORT_BINSTRING / BINSTRING, uint8 arrays through numpy.core.multiarray."""
    out = bytearray(b"\x80\x02")

    def put(o) -> None:
        if isinstance(o, bytes):
            out.extend(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<i", len(o)) + o)
        elif isinstance(o, bool) or not isinstance(o, (int, list, dict, np.ndarray)):
            raise TypeError(type(o))
        elif isinstance(o, int):
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o))
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                put(v)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        else:
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01(")
            for d in o.shape:
                put(d)
            out.extend(b"tcnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            put(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")

    put(obj)
    return bytes(out + b".")



CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar10_batches(per_batch: int, seed: int):
    """(file stem, images NHWC, labels) of the five train batches and the test batch."""
    rng = np.random.default_rng(seed)
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        yield stem, rng.integers(0, 255, (per_batch, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, per_batch, dtype=np.uint8)


def make_cifar10_bin(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-bin layout with `per_batch` records per file; returns (images NHWC, labels)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, images, labels in _cifar10_batches(per_batch, seed):
        planes = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane
        (root / f"{stem}.bin").write_bytes(np.concatenate([labels[:, None], planes], axis=1).tobytes())
        out[f"{stem}.bin"] = (images, labels)
    (root / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return out


def make_cifar10_python(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-py layout (Python 2 pickles), the same images as make_cifar10_bin for the same seed."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, images, labels in _cifar10_batches(per_batch, seed):
        batch = {b"batch_label": stem.encode(), b"labels": labels.tolist(),
                 b"data": images.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (root / stem).write_bytes(py2_pickle(batch))
        out[stem] = (images, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(py2_pickle(meta))
    return out


def md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


class RangeServer:
    """A threading HTTP server on 127.0.0.1 serving `root`, honouring `Range: bytes=N-`.

    `requests` records (path, range header, bytes sent) for every GET.
    """

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                f = server.root / self.path.lstrip("/")
                rng = self.headers.get("Range")
                if not f.is_file():
                    server.requests.append((self.path, rng, 0))
                    self.send_error(404)
                    return
                data = f.read_bytes()
                start = 0
                if rng:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m[1]) if m else 0
                    if start >= len(data):
                        server.requests.append((self.path, rng, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server.requests.append((self.path, rng, len(body)))

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
