"""Batched multi-crop views for LeJEPA (docs/method.md section 2), on whatever device the images are on.

    global_views, local_views = make_views(images, cfg.views, mean=ds.mean, std=ds.std, generator=g)
    # (Vg, N, C, Gs, Gs) float32, and (Vl, N, C, Ls, Ls) or None when cfg.views.local_views == 0

Every view of every image is produced by the same few tensor ops, never a Python loop over images.
Each view group (globals, then locals) draws one (V, N, 32) block of uniforms from `generator`, always
the same count whatever the probabilities or channel count, so one generator state gives
bit-identical views on the same device (exact resume) and the global RNG is never touched.

Definitions (torchvision's unless noted):
- Random-resized crop: up to 10 trials of area fraction ~ U(scale) and log-uniform aspect ratio;
  the first trial that fits wins, else the centre crop with the ratio clamped into range (so scale
  (1, 1), ratio (1, 1) on a non-square image gives its centre square). Unlike torchvision the box is
  continuous (sub-pixel), not rounded to whole pixels. Resampling is bilinear through one
  `grid_sample` per view group, never reading outside the crop box (as if the crop were cut out and
  resized). Anti-aliasing: a crop larger than twice the output is read from a 2x2-box mip level of
  the image, the finest one at which it is at most 2x the output, so bilinear never skips pixels.
- Horizontal flip: folded into the sampling grid (free).
- Colour jitter: brightness (x * f), contrast (blend with the mean of the grayscale image),
  saturation (blend with the grayscale image), each clamped to [0, 1] as torchvision does; hue is
  NOT torchvision's HSV shift but a rotation of the YIQ chroma plane by f turns (one 3x3 matrix per
  sample, luma kept, then clamped), which is far cheaper. Applied in the fixed order brightness,
  contrast, saturation, hue: torchvision shuffles the order per image, but without clamping the
  first three (nearly) commute, and a fixed order needs no host-device sync.
- Grayscale: luma 0.2989 R + 0.587 G + 0.114 B copied to the three channels.
- Gaussian blur: sigma ~ U(blur_sigma) in output pixels (not rescaled to the view size), separable,
  reflect padding, radius ceil(3 * max sigma) capped so the kernel fits the view.
- Solarize: values >= threshold / 255 become 1 - value.
- Single-channel images skip saturation, hue and grayscale; their brightness and contrast run as
  one affine map clamped once (see `_jitter_mono_`).
- Sensor corruptions (noise, shot noise, brightness / contrast shifts, dead pixels, JPEG blocks;
  `corruptions.py`), each with its own probability, after the ops above, on the views
  `corrupt_views` names (all, global or local); all off by default, and then nothing more is
  drawn, so default views are unchanged.
Everything runs in float32 in [0, 1], also inside an autocast region, and normalises last. On the CPU
a gated op is computed only for the samples it applies to; on an accelerator for all, then picked
with `where`, so the whole function queues kernels without waiting on the device.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lejepa_cli.image import corruptions
from lejepa_cli.config import ViewsConfig

_TRIALS = 10  # torchvision's random-resized-crop attempts before the centre-crop fallback
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights

# Columns of the per-view uniform draws.
_C_SCALE = slice(0, _TRIALS)
_C_RATIO = slice(_TRIALS, 2 * _TRIALS)
_C_POS_X, _C_POS_Y, _C_FLIP = 2 * _TRIALS, 2 * _TRIALS + 1, 2 * _TRIALS + 2
_C_JITTER = 2 * _TRIALS + 3  # gate, then brightness, contrast, saturation, hue factors
_C_GRAY = _C_JITTER + 5
_C_BLUR = _C_GRAY + 1  # gate, then sigma
_C_SOLAR = _C_BLUR + 2
_NUM_DRAWS = _C_SOLAR + 1


def make_views(
    images: Tensor,
    cfg: ViewsConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor | None]:
    """Global views (Vg, N, C, Gs, Gs) and local views (Vl, N, C, Ls, Ls) or None, normalised float32.

    `images` is a (N, C, H, W) uint8 batch (C = 1 or 3, any H, W); `generator` lives on its device.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"images must be a (N, C, H, W) uint8 batch with C = 1 or 3, got {got}")
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device}, images on {images.device}: they must share a device")
    n, c, h, w = images.shape
    if len(mean) not in (1, c) or len(std) not in (1, c):
        raise ValueError(f"mean/std need 1 or {c} values, got {len(mean)} and {len(std)}")
    # float32 even when called inside the trainer's autocast region (its matmuls and convs would
    # otherwise run in bf16 and hand back mixed dtypes).
    with torch.autocast(images.device.type, enabled=False):
        return _make_views(images, cfg, mean, std, generator)


def _make_views(
    images: Tensor, cfg: ViewsConfig, mean: Sequence[float], std: Sequence[float], generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = images.shape
    groups = [(cfg.global_size, cfg.global_scale)]
    if cfg.local_views > 0:
        groups.append((cfg.local_size, cfg.local_scale))
    levels = max(_mip_levels(h, w, size, scale, cfg.ratio) for size, scale in groups)
    atlas = _MipAtlas(images.float().div_(255), levels)  # (N, C, Ha, Wa) in [0, 1]
    mean_t = _constant(images.device, tuple(mean)).view(1, -1, 1, 1)
    std_t = _constant(images.device, tuple(std)).view(1, -1, 1, 1)
    ops = corruptions.active(cfg)  # none by default: then nothing more is drawn and views are unchanged

    def group(views: int, size: int, scale: tuple[float, float], kind: str) -> Tensor:
        u = torch.rand(views, n, _NUM_DRAWS, generator=generator, device=images.device)  # (V, N, D)
        x = atlas.crops(u, size, scale, cfg.ratio, cfg.flip_p)  # (V*N, C, S, S)
        x = _photometric(x, u.view(views * n, _NUM_DRAWS), cfg)
        if ops and cfg.corrupt_views in ("all", kind):
            x = _corrupt(x, ops, cfg, generator)
        x = x.sub_(mean_t).div_(std_t)
        return x.view(views, n, c, size, size)

    global_views = group(cfg.global_views, cfg.global_size, cfg.global_scale, "global")
    local_views = group(cfg.local_views, cfg.local_size, cfg.local_scale, "local") if cfg.local_views > 0 else None
    return global_views, local_views


# ---- geometry: random-resized crop + flip ------------------------------------------------------


class _MipAtlas:
    """The image and its 2x2-box mip levels packed side by side in one tensor.

    Level 0 sits at the top left, levels 1.. are stacked in a column to its right, so a single
    `grid_sample` can read every sample from the level its downscale factor calls for.
    """

    def __init__(self, x: Tensor, levels: int) -> None:
        n, c, h, w = x.shape
        pyramid = [x]
        for _ in range(levels):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2, ceil_mode=True))
        if levels == 0:
            self.tensor = x
            table = [(0, 0, w, h)]
        else:
            col_h = sum(p.shape[-2] for p in pyramid[1:])
            self.tensor = x.new_zeros(n, c, max(h, col_h), w + pyramid[1].shape[-1])
            self.tensor[..., :h, :w] = x
            table, y = [(0, 0, w, h)], 0
            for p in pyramid[1:]:
                ph, pw = p.shape[-2:]
                self.tensor[..., y : y + ph, w : w + pw] = p
                table.append((w, y, pw, ph))
                y += ph
        self.size = (h, w)
        self.levels = levels
        self.table = _constant(x.device, sum(table, ())).view(-1, 4)  # (L+1, 4): x0, y0, w, h per level

    def crops(
        self, u: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float
    ) -> Tensor:
        """Resized crops (V*N, C, S, S) for the boxes and flips drawn in `u` (V, N, D)."""
        v, n = u.shape[:2]
        left, top, cw, ch = _crop_boxes(u, self.size, scale, ratio)  # (V, N) each, level-0 pixels
        # Mip level: floor(log2(downscale)), so the level read is at most 2x larger than the output.
        level = torch.log2((cw * ch).sqrt() / size).floor().clamp_(0, self.levels).long()
        x0, y0, lw, lh = self.table[level].unbind(-1)  # (V, N) each
        inv = torch.exp2(-level.float())  # level-0 pixels -> level pixels

        t = (torch.arange(size, device=u.device, dtype=torch.float32) + 0.5) / size  # (S,) output centres
        tx = torch.where((u[..., _C_FLIP] < flip_p)[..., None], 1 - t, t)  # (V, N, S)
        gx = self._axis(left, cw, tx, inv, x0, lw, self.tensor.shape[-1]).transpose(0, 1)  # (N, V, S)
        gy = self._axis(top, ch, t.expand(v, n, size), inv, y0, lh, self.tensor.shape[-2]).transpose(0, 1)
        grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)  # (N, V, S, S, 2)
        # Views stacked along the grid's height: one call, no copy of the source per view.
        grid = grid.view(n, v * size, size, 2)
        out = F.grid_sample(self.tensor, grid, mode="bilinear", padding_mode="border", align_corners=True)
        c = out.shape[1]
        return out.view(n, c, v, size, size).permute(2, 0, 1, 3, 4).reshape(v * n, c, size, size)

    @staticmethod
    def _axis(
        start: Tensor, length: Tensor, t: Tensor, inv: Tensor, offset: Tensor, extent: Tensor, full: int
    ) -> Tensor:
        """Grid coordinates along one axis (V, N, S), normalised for align_corners=True."""
        pos = start[..., None] + t * length[..., None]  # level-0 pixel edges
        half = (length * 0.5).clamp(max=0.5)[..., None]  # stay inside the box, even a sub-pixel one
        pos = torch.minimum(torch.maximum(pos, start[..., None] + half), (start + length)[..., None] - half)
        pos = pos * inv[..., None] - 0.5  # pixel centres of the chosen level
        pos = torch.minimum(pos.clamp(min=0), (extent - 1)[..., None]) + offset[..., None]
        return pos * (2 / max(full - 1, 1)) - 1


def _mip_levels(h: int, w: int, size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> int:
    """Mip levels the largest possible crop needs to be read at most 2x larger than the output."""
    # When every trial box fits, no crop exceeds the largest scale; else the fallback can be the whole image.
    always_fits = scale[1] * ratio[1] * h <= w and scale[1] * w <= ratio[0] * h
    area = scale[1] * h * w if always_fits else h * w
    return max(0, math.floor(math.log2(math.sqrt(area) / size)))


def _crop_boxes(
    u: Tensor, hw: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's RandomResizedCrop box, for every view at once: left, top, width, height (V, N)."""
    h, w = hw
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., _C_SCALE])  # (V, N, T)
    r = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., _C_RATIO])
    tw, th = (area * r).sqrt(), (area / r).sqrt()
    fits = (tw <= w) & (th <= h)
    first = fits.to(torch.uint8).argmax(-1, keepdim=True)  # first trial that fits (0 when none)
    tw, th = tw.gather(-1, first).squeeze(-1), th.gather(-1, first).squeeze(-1)
    found = fits.any(-1)
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    if w / h < ratio[0]:
        fw, fh = w, w / ratio[0]
    elif w / h > ratio[1]:
        fw, fh = h * ratio[1], h
    else:
        fw, fh = w, h
    cw = torch.where(found, tw, fw)
    ch = torch.where(found, th, fh)
    left = torch.where(found, u[..., _C_POS_X] * (w - cw), (w - cw) / 2)
    top = torch.where(found, u[..., _C_POS_Y] * (h - ch), (h - ch) / 2)
    return left, top, cw, ch


# ---- photometry --------------------------------------------------------------------------------
# The ops below work in place on the batch they are given: make_views owns every buffer they see,
# and on the CPU each avoided allocation of a view-sized tensor saves as much time as the op itself.


def _photometric(x: Tensor, u: Tensor, cfg: ViewsConfig) -> Tensor:
    """Jitter, grayscale, blur, solarize on (B, C, S, S) in [0, 1], per sample by the draws u (B, D)."""
    rgb = x.shape[1] == 3

    def span(lo: float, hi: float, col: int) -> Tensor:
        return lo + (hi - lo) * u[:, col]

    b, c, s, hue = cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue
    factors = torch.stack(
        [
            span(max(0.0, 1 - b), 1 + b, _C_JITTER + 1),
            span(max(0.0, 1 - c), 1 + c, _C_JITTER + 2),
            span(max(0.0, 1 - s), 1 + s, _C_JITTER + 3),
            span(-hue, hue, _C_JITTER + 4),
        ],
        dim=1,
    )  # (B, 4)
    jitter = u[:, _C_JITTER] < cfg.jitter_p  # (B,)
    if rgb:
        x = _gated(x, jitter, _jitter_rgb_, factors)
        x = _gated(x, u[:, _C_GRAY] < cfg.grayscale_p, lambda x, _: x.copy_(_gray(x).expand_as(x)), factors)
    else:  # every sample; where jitter did not fire the factors are 1, an exact identity
        x = _jitter_mono_(x, torch.where(jitter[:, None], factors[:, :2], 1.0))
    radius = min(math.ceil(3 * cfg.blur_sigma[1]), (x.shape[-1] - 1) // 2)
    if radius > 0:
        sigma = span(cfg.blur_sigma[0], cfg.blur_sigma[1], _C_BLUR + 1)[:, None]  # (B, 1)
        x = _gated(x, u[:, _C_BLUR] < cfg.blur_p, lambda x, sg: _blur(x, sg[:, 0], radius), sigma)
    thr = cfg.solarize_threshold / 255
    return _gated(x, u[:, _C_SOLAR] < cfg.solarize_p, lambda x, _: torch.where(x >= thr, 1 - x, x), factors)


def _corrupt(x: Tensor, ops: list[str], cfg: ViewsConfig, generator: torch.Generator) -> Tensor:
    """The sensor corruptions `ops` (those with probability > 0) on (B, C, S, S) in [0, 1].

    Draws come after the view group's own, from the same generator: a gate and a strength per op
    (B, 2 * len(ops)), then the noise or pixel draws each op needs, the same count whatever the
    gates, so views stay bit-identical for one generator state. A sample whose gate did not fire
    gets its op's identity strength (std 0, offset 0, factor 1, fraction 0): exact, and no selection;
    the JPEG op has no identity strength and runs gated.
    """
    b, dev = x.shape[0], x.device
    u = torch.rand(b, 2 * len(ops), generator=generator, device=dev)  # (B, 2K): gate, strength
    for i, name in enumerate(ops):
        p_key, s_key = corruptions.OPS[name]
        lo, hi = getattr(cfg, s_key)
        fire = u[:, 2 * i] < getattr(cfg, p_key)  # (B,)
        strength = lo + (hi - lo) * u[:, 2 * i + 1]  # (B,)
        if name == "jpeg":
            x = _gated(x, fire, lambda x, q: corruptions.jpeg_blocks(x, q[:, 0]), strength[:, None])
            continue
        idle = 1.0 if name == "contrast_shift" else 0.0
        strength = torch.where(fire, strength, idle)
        if name == "noise":
            x = corruptions.gaussian_noise(x, strength, torch.randn(x.shape, generator=generator, device=dev))
        elif name == "shot_noise":
            x = corruptions.shot_noise(x, strength, torch.randn(x.shape, generator=generator, device=dev))
        elif name == "dead_pixels":
            sites = torch.rand(b, 1, *x.shape[2:], generator=generator, device=dev)  # (B, 1, S, S)
            x = corruptions.dead_pixels(x, strength, sites)
        elif name == "brightness_shift":
            x = corruptions.brightness_shift(x, strength)
        else:
            x = corruptions.contrast_shift(x, strength)
    return x


def _gated(x: Tensor, gate: Tensor, fn: Callable[[Tensor, Tensor], Tensor], params: Tensor) -> Tensor:
    """fn(x, params) on the samples whose gate (B,) fired, the others unchanged; fn may work in place.

    On the CPU only the chosen samples are computed (saves the skipped work); on an accelerator all
    are and a `where` picks, which avoids the host-device sync that selecting by mask costs.
    """
    if not _select_by_index(x.device):
        return torch.where(gate.view(-1, 1, 1, 1), fn(x.clone(), params), x)
    idx = gate.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, params)
    rows = x.reshape(x.shape[0], -1)  # 2-D indexing: several times faster than 4-D on the CPU (x may be a strided view)
    done = fn(rows.index_select(0, idx).view(-1, *x.shape[1:]), params.index_select(0, idx))
    return rows.index_copy_(0, idx, done.reshape(idx.numel(), -1)).view_as(x)


def _select_by_index(device: torch.device) -> bool:
    return device.type == "cpu"


def _gray(x: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, 1, S, S) luma."""
    return (x[:, 0:1] * _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def _jitter_mono_(x: Tensor, f: Tensor) -> Tensor:
    """Brightness b then contrast c of (B, 1, S, S), factors f (B, 2), as ONE affine map, in place.

    c * (b x) + (1 - c) * mean(b x) = (b c) x + (1 - c) b mean(x), clamped once: one pass instead
    of five. torchvision clamps after brightness too; only pixels that b pushed above 1 differ.
    (The RGB path keeps torchvision's clamp after each op: fusing it there changed the demo's
    result, 0.757 vs 0.830 linear top-1 in one run each, and is not worth the small speed-up.)
    """
    bright, contrast = f[:, 0], f[:, 1]
    shift = (1 - contrast) * bright * x.mean(dim=(-3, -2, -1))  # (B,)
    return x.mul_((bright * contrast).view(-1, 1, 1, 1)).add_(shift.view(-1, 1, 1, 1)).clamp_(0, 1)


def _jitter_rgb_(x: Tensor, f: Tensor) -> Tensor:
    """Brightness, contrast, saturation, hue of (B, 3, S, S) with factors f (B, 4)."""
    k = f[:, :, None, None, None]  # (B, 4, 1, 1, 1)
    x.mul_(k[:, 0]).clamp_(0, 1)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
    x.lerp_(mean.expand_as(x), 1 - k[:, 1]).clamp_(0, 1)
    x.lerp_(_gray(x).expand_as(x), 1 - k[:, 2]).clamp_(0, 1)
    return _hue_yiq(x, f[:, 3])


def _hue_yiq(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the chroma plane (I, Q) of YIQ by shift (B,) turns: one 3x3 colour matrix per sample.

    A linear stand-in for torchvision's HSV hue shift: grays stay put, the luma Y is kept, and it
    costs one pass over the pixels instead of some twenty; colours pushed out of gamut are clamped.
    """
    angle = 2 * math.pi * shift
    cos, sin = torch.cos(angle) - 1, torch.sin(angle)
    zero = torch.zeros_like(cos)
    rot = torch.stack([zero, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(-1, 3, 3)  # R - I
    yiq, yiq_inv = _constant(x.device, _YIQ).view(2, 3, 3)
    # I + T^-1 (R - I) T: exactly the identity at shift 0, where T^-1 T would be off by rounding.
    mat = torch.eye(3, device=x.device) + yiq_inv @ rot @ yiq  # (B, 3, 3)
    bsz, c, h, w = x.shape
    return torch.bmm(mat, x.view(bsz, c, h * w)).view(bsz, c, h, w).clamp_(0, 1)


_BLUR_MATMUL_MAX = 48  # views up to this side blur by matmul (measured crossover with the conv: ~48-96 px)

_YIQ64 = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ = tuple(torch.cat([_YIQ64.flatten(), torch.linalg.inv(_YIQ64).flatten()]).tolist())  # RGB -> YIQ, back


@functools.lru_cache(maxsize=64)
def _constant(device: torch.device, values: tuple[float, ...]) -> Tensor:
    """A small float32 constant on `device`, copied there once: a host-to-device copy on every
    call would synchronise an accelerator's stream every step."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur of (B, C, S, S) with per-sample sigma (B,), reflect padding."""
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    bsz, c, h, w = x.shape
    if h == w and h <= _BLUR_MATMUL_MAX:
        # Small views: blur = M x M^T with the kernel and the reflect padding in one (S, S) matrix per
        # sample; batched matmuls beat a depthwise conv with thousands of tiny groups (4x at 16 px).
        src = torch.arange(h, device=x.device)[:, None] + taps.long()  # (S, K) source pixel per tap
        src = torch.where(src < 0, -src, torch.where(src > h - 1, 2 * (h - 1) - src, src))
        mat = x.new_zeros(bsz, h, h).scatter_add_(2, src.expand(bsz, -1, -1), kernel[:, None].expand(-1, h, -1))
        mat = mat[:, None]  # (B, 1, S, S)
        return mat @ x @ mat.transpose(-1, -2)
    k = kernel.repeat_interleave(c, dim=0)  # (B*C, K): one depthwise filter per sample and channel
    y = F.pad(x.reshape(1, bsz * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(-1, 1, 1, 2 * radius + 1), groups=bsz * c)  # along width
    y = F.conv2d(y, k.view(-1, 1, 2 * radius + 1, 1), groups=bsz * c)  # along height
    return y.view(bsz, c, h, w)
