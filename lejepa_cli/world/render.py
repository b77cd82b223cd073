"""Anti-aliased drawing of discs and squares into a batch of float RGB canvases (numpy only).

Coordinates are world units in [0, 1] x [0, 1]; column = x * R, row = y * R (row 0 at the top).
Each shape is drawn only inside its small bounding patch, gathered for the whole batch with
one fancy index, so drawing costs O(B * patch^2), not O(B * R^2). Canvases carry a margin of
`PAD` pixels on every side, so patches near an edge never need clipping (clipped indices could
repeat a pixel and let an untouched copy overwrite a drawn one); `finish` crops it off.
"""

from __future__ import annotations

import math

import numpy as np

PAD = 8  # pixels of margin around each canvas


def hue_matrix(degrees: float) -> np.ndarray:
    """(3, 3) rotation of RGB about the grey axis by `degrees` (Rodrigues' formula about (1, 1, 1) / sqrt(3))."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    k = 1.0 / 3.0
    w = math.sqrt(k) * s
    return np.array(
        [
            [c + k * (1 - c), k * (1 - c) - w, k * (1 - c) + w],
            [k * (1 - c) + w, c + k * (1 - c), k * (1 - c) - w],
            [k * (1 - c) - w, k * (1 - c) + w, c + k * (1 - c)],
        ]
    )


def rotate_hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours (..., 3) in [0, 1] about the grey axis by `degrees` (keeps brightness)."""
    if degrees == 0:
        return rgb
    return np.clip(rgb @ hue_matrix(degrees).T, 0.0, 1.0)


def blank(batch: int, resolution: int, background: np.ndarray) -> np.ndarray:
    """(B, R + 2 PAD, R + 2 PAD, 3) float32 canvases filled with `background` ((R, R, 3) or (3,))."""
    size = resolution + 2 * PAD
    canvas = np.empty((batch, size, size, 3), dtype=np.float32)
    background = np.asarray(background, dtype=np.float32)
    if background.ndim == 1:
        canvas[:] = background
    else:
        canvas[:] = np.pad(background, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
    return canvas


def _patch(canvas: np.ndarray, lo_px: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column indices (B, k) of a k x k patch starting at pixel `lo_px` (B, 2) (x, y)."""
    size = canvas.shape[1]
    start = np.clip(np.floor(lo_px).astype(np.int64) - 1 + PAD, 0, size - k)  # (B, 2) canvas coords
    cols = start[:, 0:1] + np.arange(k)  # (B, k)
    rows = start[:, 1:2] + np.arange(k)
    return rows, cols, np.arange(len(canvas))[:, None, None]


def _blend(canvas: np.ndarray, rows: np.ndarray, cols: np.ndarray, b: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    r, c = rows[:, :, None], cols[:, None, :]
    patch = canvas[b, r, c]  # (B, k, k, 3)
    a = alpha[..., None]  # (B, k, k, 1)
    canvas[b, r, c] = patch + a * (np.asarray(colour, dtype=np.float32).reshape(-1, 1, 1, 3) - patch)


def discs(canvas: np.ndarray, centres: np.ndarray, radius: float, colour: np.ndarray) -> None:
    """Draw one disc per canvas: centres (B, 2) in world units, colour (3,) or (B, 3)."""
    R = canvas.shape[1] - 2 * PAD
    r_px = radius * R
    k = int(math.ceil(2 * r_px)) + 3
    c_px = centres * R  # (B, 2)
    rows, cols, b = _patch(canvas, c_px - r_px, k)
    dx = cols - PAD + 0.5 - c_px[:, 0:1]  # (B, k) pixel-centre offsets
    dy = rows - PAD + 0.5 - c_px[:, 1:2]
    dist = np.sqrt(dx[:, None, :] ** 2 + dy[:, :, None] ** 2)  # (B, k, k)
    _blend(canvas, rows, cols, b, np.clip(r_px + 0.5 - dist, 0.0, 1.0).astype(np.float32), colour)


def squares(canvas: np.ndarray, centres: np.ndarray, half: float, colour: np.ndarray) -> None:
    """Draw one axis-aligned square (half side `half`, world units) per canvas."""
    R = canvas.shape[1] - 2 * PAD
    h_px = half * R
    k = int(math.ceil(2 * h_px)) + 3
    c_px = centres * R
    rows, cols, b = _patch(canvas, c_px - h_px, k)
    x0 = cols - PAD  # (B, k) pixel left edges
    y0 = rows - PAD
    lo, hi = c_px - h_px, c_px + h_px  # (B, 2)
    ax = np.clip(np.minimum(x0 + 1, hi[:, 0:1]) - np.maximum(x0, lo[:, 0:1]), 0.0, 1.0)  # (B, k) coverage
    ay = np.clip(np.minimum(y0 + 1, hi[:, 1:2]) - np.maximum(y0, lo[:, 1:2]), 0.0, 1.0)
    _blend(canvas, rows, cols, b, (ay[:, :, None] * ax[:, None, :]).astype(np.float32), colour)


def static_rect(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour: np.ndarray) -> None:
    """Draw an axis-aligned rectangle (world units) into one (R, R, 3) float image, anti-aliased."""
    R = image.shape[0]
    edges = np.arange(R, dtype=np.float64)
    ax = np.clip(np.minimum(edges + 1, x1 * R) - np.maximum(edges, x0 * R), 0.0, 1.0)  # (R,)
    ay = np.clip(np.minimum(edges + 1, y1 * R) - np.maximum(edges, y0 * R), 0.0, 1.0)
    a = (ay[:, None] * ax[None, :])[..., None]  # (R, R, 1)
    image[:] = image + a * (np.asarray(colour) - image)


def finish(canvas: np.ndarray) -> np.ndarray:
    """Crop the margin and quantise: (B, R, R, 3) uint8."""
    inner = canvas[:, PAD:-PAD, PAD:-PAD]
    return (np.clip(inner, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
