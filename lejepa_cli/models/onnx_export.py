"""An encoder as an ONNX graph: dynamic batch, height and width, checked against PyTorch.

ResNets end in a global average pool, so any input size traces into one graph. A ViT adds
position embeddings resampled (bicubic, antialiased, as timm does) to the input's patch grid;
the graph is traced at a grid other than the native one, so the resampling is part of it and
runs for every input size (at the native size it is the identity). PyTorch's TorchScript
exporter has no rule for the antialiased bicubic resample, so one is registered for the
duration of the export: ONNX Resize (opset 18) with antialias, cubic coefficient -0.5 (the
antialiased filter's) and weights renormalised at the border, which is what PyTorch computes.
Height and width must be multiples of the ViT's patch size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lejepa_cli.errors import RunFailed, UserError

ONNX_TOLERANCE = 1e-3  # max abs difference accepted at export; fp32 kernels typically differ by ~1e-6
OPSET = 18  # Resize with antialias needs opset 18


def onnx_runtime() -> Any:
    """onnxruntime (and onnx, which the exporter needs), or a UserError saying how to get them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'lejepa-cli[onnx]'") from None
    return onnxruntime


def _bicubic_aa_symbolic(g: Any, x: Any, output_size: Any, align_corners: Any, *scales: Any) -> Any:
    """aten::_upsample_bicubic2d_aa -> ONNX Resize; output_size may be a traced (dynamic) size."""
    from torch.onnx import symbolic_helper

    shape = g.op("Shape", x)
    batch_channels = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])),
                          g.op("Constant", value_t=torch.tensor([2])))
    size = symbolic_helper._maybe_get_const(output_size, "is")
    if symbolic_helper._is_value(size):
        size = g.op("Cast", output_size, to_i=7)  # 7: INT64
    else:
        size = g.op("Constant", value_t=torch.tensor(size, dtype=torch.int64))
    sizes = g.op("Concat", batch_channels, size, axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, sizes, mode_s="cubic", cubic_coeff_a_f=-0.5, antialias_i=1,
                exclude_outside_i=1, coordinate_transformation_mode_s="half_pixel")


def trace_size(backbone: nn.Module, image_size: int) -> int:
    """The side to trace at: a ViT's native side plus one patch, so the pos_embed resampling is traced."""
    patch = getattr(backbone, "patch_size", None)
    return image_size + int(patch) if isinstance(getattr(backbone, "pos_embed", None), torch.Tensor) else image_size


def check_sizes(backbone: nn.Module, image_size: int) -> list[tuple[int, int]]:
    """Input sizes the exported graph is checked at: native, smaller and larger (patch multiples for a ViT)."""
    step = int(getattr(backbone, "patch_size", None) or 8)
    smaller = max(step, (image_size // 2) // step * step)
    return [(image_size, image_size), (smaller, smaller), (image_size + 2 * step, image_size + step)]


def export_onnx(backbone: nn.Module, path: Path, *, image_size: int, channels: int) -> tuple[float, list[list[int]]]:
    """Trace `backbone` (fp32, CPU) to ONNX with dynamic batch, height and width axes.

    Returns the max abs difference from PyTorch over batches of 2 and 3 images at the sizes of
    `check_sizes` (raises above ONNX_TOLERANCE), and those sizes.
    """
    ort = onnx_runtime()
    was_training = backbone.training
    first = next(iter(backbone.parameters()))
    model = backbone.eval().to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    side = trace_size(model, image_size)
    example = torch.randn(2, channels, side, side, generator=gen)
    tmp = path.with_name(f".{path.name}.tmp")
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "embedding": {0: "batch"}}
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _bicubic_aa_symbolic, OPSET)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # dynamo=False: the TorchScript exporter, which needs no onnxscript. It warns that it is
            # deprecated, and about the ViT's Python shape checks (patch multiple; native grid),
            # which tracing freezes at the traced size: hence tracing off the native grid.
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["images"],
                              output_names=["embedding"], opset_version=OPSET, dynamic_axes=dynamic)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff, sizes = 0.0, check_sizes(model, image_size)
        with torch.no_grad():
            for n, (h, w) in ((n, hw) for hw in sizes for n in (2, 3)):  # batches and sizes other than traced
                x = torch.randn(n, channels, h, w, generator=gen)
                got = session.run(None, {"images": x.numpy()})[0]
                diff = max(diff, float((torch.from_numpy(got) - model(x)).abs().max()))
        if not diff <= ONNX_TOLERANCE:
            raise RunFailed(f"ONNX output differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE:g}); {path} not written")
        os.chmod(tmp, 0o644)  # an export is meant to be shared
        os.replace(tmp, path)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::_upsample_bicubic2d_aa", OPSET)
        tmp.unlink(missing_ok=True)
        backbone.to(first.device, first.dtype).train(was_training)
    return diff, [list(s) for s in sizes]
