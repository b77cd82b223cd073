"""Generators of small test datasets (image folders with bad files, IDX, CIFAR binary) and a
local HTTP server with Range support, shared by test_data_prepare.py and test_fetch.py."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import re
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


def make_cifar10_bin(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-bin layout with `per_batch` records per file; returns (images NHWC, labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 255, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch, dtype=np.uint8)
        planes = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane
        (root / name).write_bytes(np.concatenate([labels[:, None], planes], axis=1).tobytes())
        out[name] = (images, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
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
