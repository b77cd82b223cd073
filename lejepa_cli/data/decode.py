"""Decoding for `lejepa data prepare`: one image (path, encoded bytes or pixel array) -> (R, R, C) uint8.

Every image is decoded with Pillow (EXIF orientation applied; L/LA/P/RGBA/CMYK/16-bit converted),
the shorter side resized to the resolution and centre-cropped. A file that cannot be decoded
raises Skip with the reason prepare records in out/skipped.jsonl; it never stops the run. Only
safe formats are opened, and images over the pixel limit are skipped. decide_geometry picks the
output resolution and channels from the image headers; the worker helpers run decoding in the
pool's processes.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from lejepa_cli.data.readers import Items

# Formats Pillow may try. EPS is left out on purpose: opening it runs Ghostscript.
_WANTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "MPO", "AVIF", "QOI", "JPEG2000", "DIB")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SMALL_SIDE = 64  # sources whose images all share one size <= this keep their size by default
DEFAULT_RESOLUTION = 256


# ---------------------------------------------------------------------------------------------
# Decoding: one image -> (R, R, C) uint8, or a skip reason. Runs in the worker processes.


@functools.cache
def _safe_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; keep those this Pillow build has
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


class Skip(Exception):
    """This file cannot become a training image; the message is the reason recorded."""


def _to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 instead of scaling them, so scale here.
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img


def _square(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Any Pillow image -> (R, R, C) uint8: colour conversion, shorter side to R, centre crop."""
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels hold arbitrary colours; show them as a white background would.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        s = min(w, h)  # the centre square, cropped and resized in one resampling pass
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _array_image(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> L, L, RGB or RGBA image."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    mode = "L" if arr.ndim == 2 else {3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(arr, mode)


def decode(payload: Any, resolution: int, channels: int) -> np.ndarray:
    """One payload (path, bytes or pixel array) -> (R, R, C) uint8; raises Skip with a reason."""
    if isinstance(payload, np.ndarray):
        if payload.shape == (resolution, resolution, channels):
            return np.asarray(payload, dtype=np.uint8)
        if payload.shape == (resolution, resolution) and channels == 1:
            return np.asarray(payload, dtype=np.uint8)[..., None]
        return _square(_array_image(payload), resolution, channels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(payload, str):
                try:
                    if os.path.getsize(payload) == 0:
                        raise Skip("empty file")
                except (FileNotFoundError, NotADirectoryError):
                    raise Skip("missing file") from None
                fp: Any = payload
            else:
                if not payload:
                    raise Skip("empty file")
                fp = io.BytesIO(payload)
            with Image.open(fp, formats=_safe_formats()) as img:
                if img.format == "JPEG" and img.mode in ("RGB", "L"):
                    img.draft(img.mode, (resolution, resolution))  # DCT-domain downscale, >= R kept
                img = ImageOps.exif_transpose(img)
                return _square(img, resolution, channels)
    except Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Skip(f"too large ({str(e).split(',')[0]})") from None
    except UnidentifiedImageError:
        raise Skip("not an image (or an unsupported format)") from None
    except Exception as e:  # Pillow raises many types on bad data; none may stop the run
        msg = " ".join(str(e).split())[:200]
        raise Skip(f"corrupt or truncated ({type(e).__name__}: {msg})") from None


def _decode_chunk(task: tuple[int, list[Any]], resolution: int, channels: int) -> tuple[int, list[np.ndarray | str]]:
    start, payloads = task
    results: list[np.ndarray | str] = []
    for payload in payloads:
        try:
            results.append(decode(payload, resolution, channels))
        except Skip as e:
            results.append(str(e))
    return start, results


def _set_limits(pixel_limit: int) -> None:
    Image.MAX_IMAGE_PIXELS = pixel_limit
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a skip, not a grey-padded image


def _worker_init(pixel_limit: int, main_pid: int) -> None:
    _set_limits(pixel_limit)
    # Pool workers outlive a SIGKILLed parent (they hold their own end of the task pipe); a
    # watchdog makes them exit instead of lingering.
    ppid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass
            if os.getppid() != ppid:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _can_spawn() -> bool:
    """Spawned workers re-import the main script by path; with `python - < script` there is none,
    and the pool would restart crashing workers forever."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def _probe(payload: Any) -> tuple[tuple[int, int], bool] | None:
    """(size, is_grey) from the image header only; None when it is not readable."""
    if isinstance(payload, np.ndarray):
        grey = payload.ndim == 2 or payload.shape[-1] == 1
        return (payload.shape[1], payload.shape[0]), grey
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fp = payload if isinstance(payload, str) else io.BytesIO(payload)
            with Image.open(fp, formats=_safe_formats()) as img:
                return img.size, img.mode in GREY_MODES
    except Exception:
        return None


def decide_geometry(splits: dict[str, Items], resolution: int | None) -> tuple[int, int]:
    """(resolution, channels): grey (1) only when every image is; the size kept only when all
    images already share one size <= 64 px, else 256. Stops reading headers once both are known."""
    sizes: set[tuple[int, int]] = set()
    grey, mixed = True, False
    for items in splits.values():
        if items.decoded and len(items):  # arrays: one shape for all
            probe = _probe(items.payloads[0])
            sizes.add(probe[0])
            grey = grey and probe[1]
            continue
        for i in range(len(items)):
            probe = _probe(items.payloads[i])
            if probe is None:
                continue
            sizes.add(probe[0])
            grey = grey and probe[1]
            mixed = len(sizes) > 1 or max(probe[0]) > SMALL_SIDE
            if not grey and (mixed or resolution is not None):
                break
        if not grey and (mixed or resolution is not None):
            break
    if resolution is None:
        one = len(sizes) == 1 and max(next(iter(sizes))) <= SMALL_SIDE
        resolution = min(next(iter(sizes))) if one else DEFAULT_RESOLUTION
    return int(resolution), 1 if grey and sizes else 3


