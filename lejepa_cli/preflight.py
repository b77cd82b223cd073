"""Before the first step: will one training step fit in memory, and is this run sized for this machine?

    from lejepa_cli.preflight import preflight
    estimate = preflight(cfg, device, train_data)   # UserError when a step cannot fit; warnings printed

`estimate_step(cfg, channels, ...)` adds up one optimizer step's memory on one process from the
config alone (the model is built on the meta device, so nothing real is allocated):
  - weights, gradients and AdamW's two moments (4 + 4 + 8 bytes per parameter; divided over the
    processes under FSDP; plus the bf16 weight copies autocast keeps for backward, and DDP's
    gradient buckets in a process group);
  - the activations autograd keeps for backward for one micro-batch (batch_size / (processes x
    grad_accum) images), all views, counted from the architecture (see `vit_saved_bytes`,
    `resnet_saved_bytes`), plus the projector's and SIGReg's;
  - backward's transient gradient buffers (twice the largest single activation), the uint8 batch
    and a fixed runtime overhead (`RUNTIME_OVERHEAD`).
The sum is what the process adds to memory once the data is loaded. tests/test_preflight.py checks
it against the measured peak resident set of real training steps on the CPU (within a factor 1.5).

`preflight` compares it with the memory available (CUDA: `torch.cuda.mem_get_info`; otherwise the
least of the host's MemAvailable, the room under a cgroup v2 or v1 memory limit and the address
space left under RLIMIT_AS (`ulimit -v`), with a sysconf fallback; per host on the CPU, so several
torchrun processes share it) and refuses with one line naming what to change. It also
warns (one yellow line each) when a run is GPU-sized but about to run on the CPU (its steps'
FLOPs at this CPU's measured matmul speed take more than `CPU_WARN_HOURS`), and when a long run
(more than `TOY_EPOCHS` passes) or upscaled views are about to train on the built-in toy shapes. `train.preflight=false` skips it all.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lejepa_cli import dist
from lejepa_cli.config import Config
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.errors import UserError
from lejepa_cli.models import build_backbone_from_config, build_projector_from_config

CPU_WARN_HOURS = 12.0  # a run whose steps alone take longer than this on the CPU is GPU-sized
TOY_EPOCHS = 100  # more passes than this over the built-in shapes is a long run on toy data (demo: 8)
# SIGReg's ECF kernel works in blocks with ~90 bytes of scratch per element, at most 2**16 elements
# per block on the CPU and 2**21 on accelerators (lejepa_cli/sigreg.py).
_ECF_SCRATCH = {"cpu": 90 << 16}
_ECF_SCRATCH_ACCEL = 90 << 21
# What the first steps cost beyond tensors: allocator arenas, oneDNN's kernels, the loader's
# thread (measured 40-60 MiB on the CPU for the smallest configs in tests/test_preflight.py).
RUNTIME_OVERHEAD = 64 << 20
_GiB = 2**30
# Address space (not memory) each thread of a step maps: an 8 MiB stack and glibc's 64 MiB malloc
# arena (measured: peak VmSize exceeds peak VmRSS by 40-60 MiB per thread on the demo's step).
THREAD_ADDRESS_SPACE = 72 << 20
_V1_NO_LIMIT = 1 << 60


@dataclass
class StepEstimate:
    """Bytes of one optimizer step on one process, by part, and its FLOPs."""

    params: int  # trained parameters (backbone + projector + online probe)
    state: int  # weights + gradients + AdamW moments (+ autocast copies, DDP buckets)
    activations: int  # saved for backward: encoder (one micro-batch) + projector + SIGReg (per-process batch)
    transient: int  # backward's gradient buffers, the uint8 batch, RUNTIME_OVERHEAD
    flops: float  # forward + backward FLOPs of the encoder for one optimizer step on this process
    micro_batch: int  # images per encoder forward
    views: int  # views per image

    @property
    def total(self) -> int:
        return self.state + self.activations + self.transient


# ---- activations, from the architecture ----------------------------------------------------------


def vit_profile(vit: nn.Module, side: int, compute_bytes: int, checkpointed: bool = False) -> tuple[int, int, float]:
    """(bytes autograd keeps for backward, largest single activation, training FLOPs) for one image of `side` px.

    Per block and token, a pre-norm block keeps: its input x and the mid-block residual x1 (the
    residual stream, float32 even under autocast); the norm1 output (D), qkv (3D), the attention
    output that proj reads (D; the same storage SDPA returned), the norm2 output (D), fc1's output
    (H) and GELU's (H): 6D + 2H in the compute dtype (H = 4D); plus the two LayerNorms' mean/rstd
    and SDPA's logsumexp per head (float32). Outside the blocks: the input image (saved by the
    patch convolution) and the last block's output (saved by the final norm). Under gradient
    checkpointing only each block's input is kept, and one block at a time is recomputed, whose
    backward then also holds gradients about as large as its activations (hence two blocks).
    FLOPs: 2 per multiply-add of the patch convolution, the linear layers and attention's two
    products, times 3 for forward + backward.
    """
    patches = (side // vit.patch_size) ** 2
    tokens = patches + vit.num_prefix_tokens
    dim, hidden = vit.embed_dim, vit.blocks[0].mlp.fc1.out_features
    stream = tokens * dim * 4
    block = 2 * stream + tokens * (6 * dim + 2 * hidden) * compute_bytes + tokens * (4 + vit.num_heads) * 4
    outside = vit.in_chans * side * side * compute_bytes + stream
    kept = vit.depth * stream + 2 * block if checkpointed else vit.depth * block
    macs = patches * vit.in_chans * vit.patch_size**2 * dim + vit.depth * tokens * (4 * dim * dim + 2 * dim * hidden + 2 * tokens * dim)
    return outside + kept, tokens * hidden * compute_bytes, 6.0 * macs


def resnet_profile(resnet: nn.Module, side: int, compute_bytes: int, checkpointed: bool = False) -> tuple[int, int, float]:
    """(bytes autograd keeps for backward, largest single activation, training FLOPs) for one image of `side` px.

    Each convolution's output is kept twice: by the BatchNorm that reads it, and as the
    BatchNorm's (in-place ReLU'd, or residual-added) result that the next convolution or ReLU
    keeps; the max-pool keeps its output and int64 indices; the input image is kept by the stem.
    Shapes come from a forward on the meta device (nothing is computed). Under gradient
    checkpointing each stage keeps only its input, and one stage at a time is recomputed (counted
    twice, for its backward's gradients, as for ViT blocks). FLOPs: the convolutions' multiply-adds
    x 2, x 3 for forward + backward.
    """
    outputs: dict[str, int] = {}  # top-level child ("conv1", "layer1", ...) -> elements it keeps
    inputs: dict[str, int] = {}  # stage -> elements of its input
    largest, macs = 0, 0
    hooks = []
    for name, module in resnet.named_modules():
        top = name.split(".")[0]
        if isinstance(module, nn.Conv2d):
            def hook(m, args, out, top=top):
                nonlocal largest, macs
                outputs[top] = outputs.get(top, 0) + 2 * out[0].numel()
                largest = max(largest, out[0].numel())
                macs += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            hooks.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.MaxPool2d):
            # float output + int64 indices = 3 float32-sized elements per output element
            hooks.append(module.register_forward_hook(
                lambda m, a, out, top=top: outputs.__setitem__(top, outputs.get(top, 0) + 3 * out[0].numel())))
        elif name in ("layer1", "layer2", "layer3", "layer4"):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, top=top: inputs.__setitem__(top, args[0][0].numel())))
    try:
        with torch.no_grad():
            # two images: BatchNorm refuses one value per channel; the hooks read the first
            resnet(torch.empty(2, resnet.in_chans, side, side, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    image = resnet.in_chans * side * side
    if checkpointed:
        stages = [k for k in outputs if k in inputs]
        elements = (image + sum(v for k, v in outputs.items() if k not in inputs) + sum(inputs.values())
                    + 2 * max((outputs[k] for k in stages), default=0))
    else:
        elements = image + sum(outputs.values())
    return elements * compute_bytes, largest * compute_bytes, 6.0 * macs


def backbone_profile(backbone: nn.Module, side: int, compute_bytes: int, checkpointed: bool) -> tuple[int, int, float]:
    profile = vit_profile if hasattr(backbone, "blocks") else resnet_profile
    return profile(backbone, side, compute_bytes, checkpointed)


# ---- the estimate --------------------------------------------------------------------------------


def estimate_step(cfg: Config, channels: int, *, image_side: int, num_classes: int = 0, device_type: str = "cpu",
                  world: int = 1, amp: bool = False) -> StepEstimate:
    """Memory and FLOPs of one optimizer step of `cfg` on one of `world` processes (nothing allocated).

    `image_side`: the stored images' side (the uint8 batch).
    """
    with torch.device("meta"):
        backbone = build_backbone_from_config(cfg, channels)
        projector = build_projector_from_config(cfg, backbone.embed_dim)
    params = sum(p.numel() for m in (backbone, projector) for p in m.parameters())
    if cfg.train.online_probe and num_classes:
        params += (backbone.embed_dim + 2) * max(num_classes, 2) + backbone.embed_dim
    sharded = cfg.train.fsdp and world > 1
    state = 16 * params // (world if sharded else 1)
    state += 2 * params * amp  # bf16 copies of the weights, kept for backward
    state += 4 * params * (world > 1 and not sharded)  # DDP's gradient buckets

    per_process = cfg.train.batch_size // world
    micro = max(1, per_process // cfg.train.grad_accum)
    compute_bytes = 2 if amp else 4
    v = cfg.views
    groups = [(v.global_views, v.global_size)] + ([(v.local_views, v.local_size)] if v.local_views else [])
    encoder, largest, flops = 0, 0, 0.0
    for count, side in groups:
        kept, big, image_flops = backbone_profile(backbone, side, compute_bytes, cfg.model.grad_checkpointing)
        encoder += count * micro * kept
        largest = max(largest, count * micro * big)
        flops += count * per_process * image_flops
    if cfg.train.grad_accum > 1:
        flops *= 4 / 3  # a graph-free forward of every micro-batch first (train.lejepa_step)
    views = sum(count for count, _ in groups)
    # projector: h, two hidden layers kept by BatchNorm and ReLU each, z; SIGReg: projections + grad
    head = per_process * views * ((backbone.embed_dim + 4 * cfg.model.proj_hidden + cfg.model.proj_dim) * compute_bytes
                                  + 2 * cfg.loss.num_slices * 4)
    head += _ECF_SCRATCH.get(device_type, _ECF_SCRATCH_ACCEL)
    batch = per_process * channels * image_side * image_side  # uint8 images
    return StepEstimate(params=params, state=state, activations=encoder + head, transient=2 * largest + 2 * batch + RUNTIME_OVERHEAD,
                        flops=flops, micro_batch=micro, views=views)


# ---- the machine ---------------------------------------------------------------------------------


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc: Path = Path("/proc/self/cgroup")) -> tuple[str, str]:
    """This process's (cgroup v2 path, cgroup v1 memory controller path) from /proc/self/cgroup
    ("0::/PATH" and "N:memory:/PATH"); "/" for each it does not name."""
    v2 = v1 = "/"
    for line in (_read(proc) or "").splitlines():
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:
            v2 = path or "/"
        elif "memory" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _cgroup_room(root: Path = Path("/sys/fs/cgroup"), own: tuple[str, str] | None = None) -> int | None:
    """Bytes left under the tightest cgroup memory limit over this process; None without one.

    cgroup v2: memory.max - memory.current; cgroup v1: memory.limit_in_bytes - memory.usage_in_bytes
    under ROOT/memory (v1 writes "no limit" as about 2**63). Each in the process's own cgroup and
    every one above it (a parent's limit binds its children). `own`: (v2 path, v1 path) in place
    of /proc/self/cgroup's (tests).
    """
    v2, v1 = _own_cgroups() if own is None else own
    rooms = []
    for base, path, limit_file, used_file in ((root, v2, "memory.max", "memory.current"),
                                              (root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes")):
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            folder = base.joinpath(*parts[:depth])
            limit, used = _read(folder / limit_file), _read(folder / used_file)
            if limit and limit.isdigit() and int(limit) < _V1_NO_LIMIT and used and used.isdigit():
                rooms.append(int(limit) - int(used))
    return max(0, min(rooms)) if rooms else None


def _vm_size(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's virtual size in bytes (VmSize), None where /proc has none."""
    for line in (_read(status) or "").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return None


def _address_space_room(threads: int, limit: int | None = None, mapped: int | None = None) -> int | None:
    """Bytes a step may still use under RLIMIT_AS (`ulimit -v`); None without a limit.

    RLIMIT_AS caps virtual size, which exceeds what a step keeps resident: the room is the limit,
    less what is mapped already (libraries, the data), less THREAD_ADDRESS_SPACE for each thread
    the step runs (its stack and malloc arena). `limit` and `mapped` replace the process's (tests).
    """
    if limit is None:
        try:
            import resource
        except ImportError:  # not Unix: no RLIMIT_AS
            return None
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
    mapped = _vm_size() if mapped is None else mapped
    if mapped is None:
        return None
    return max(0, limit - mapped - THREAD_ADDRESS_SPACE * threads)


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes this process could still allocate, where that number comes from); None if unknown.

    CUDA: the device's free memory. Otherwise the least of the host's MemAvailable, the room under
    a cgroup memory limit and the room under the process's address-space limit (RLIMIT_AS).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    found = []  # CPU and MPS (unified memory): the host's
    if (meminfo := _meminfo_available()) is not None:
        found.append((meminfo, "MemAvailable"))
    if (room := _cgroup_room()) is not None:
        found.append((room, "under the cgroup memory limit"))
    if (room := _address_space_room(torch.get_num_threads() + 1)) is not None:  # + the loader's thread
        found.append((room, "address space left under ulimit -v (RLIMIT_AS)"))
    if not found:
        try:
            found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical memory"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def matmul_flops_per_s(seconds: float = 0.1) -> float:
    """This CPU's float32 matmul speed with the current threads: an upper bound on a step's FLOP/s."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    return 2 * 512**3 * runs / elapsed


# ---- the check -----------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / _GiB:.1f} GiB" if n >= _GiB / 10 else f"{n / 2**20:.0f} MiB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _what_fits(cfg: Config, room: int, estimate: Callable[[Config], StepEstimate]) -> str:
    """The smallest train.grad_accum that fits in `room` bytes, or why none does."""
    b = cfg.train.batch_size
    for accum in (a for a in range(cfg.train.grad_accum + 1, b + 1) if b % a == 0):
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
        if estimate(trial).total <= room:
            return f"train.grad_accum={accum} would fit"
    return "no train.grad_accum alone fits"


def memory_advice(cfg: Config, fits: str = "") -> str:
    """What to change in `cfg` so that a step needs less memory; `fits`: what `_what_fits` found."""
    batch = (f"lower train.batch_size (now {cfg.train.batch_size}) or raise train.grad_accum (now "
             f"{cfg.train.grad_accum}{'; ' + fits if fits else ''})")
    if cfg.objective != "image":
        return batch
    return (f"{batch}, set model.grad_checkpointing=true, or pick a smaller model.arch or views.global_size / "
            f"views.local_size")


def preflight(cfg: Config, device: torch.device, dataset: ImageDataset, autocast: torch.dtype | None = None, *,
              world: int | None = None, say: Callable[[str], None] | None = None, cpu_flops: float | None = None,
              available: tuple[int, str] | None = None) -> StepEstimate | None:
    """Refuse (UserError) a step that cannot fit; warn about a GPU-sized run on the CPU or on toy data.

    `autocast`: the training step's autocast dtype (None: float32). `cpu_flops` (FLOP/s) and
    `available` ((bytes, source)) replace the measured values (tests). Every process computes the
    estimate and they agree on refusing; only rank 0 prints.
    """
    if not cfg.train.preflight:
        return None
    if say is None:
        from lejepa_cli.logs import console

        def say(message: str) -> None:
            console.print(f"[yellow]warning: {message}", highlight=False, soft_wrap=True)
    world = dist.world_size() if world is None else world
    num_classes = dataset.num_classes if dataset.labels is not None else 0

    def estimate(c: Config) -> StepEstimate:
        return estimate_step(c, dataset.channels, image_side=dataset.resolution, num_classes=num_classes,
                             device_type=device.type, world=world, amp=autocast is not None)

    est = estimate(cfg)
    # Processes on one host share its memory; each GPU has its own.
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type != "cuda" else 1
    available = available or available_memory(device)
    too_big = available is not None and est.total * sharing > available[0]
    if dist.any_rank(too_big):
        room, source = available if available is not None else (0, "on another process")
        per = f" per process x {sharing}" if sharing > 1 else ""
        raise UserError(
            f"one training step needs about {_gib(est.total)}{per} (weights, gradients and AdamW {_gib(est.state)}, "
            f"activations of {est.micro_batch} images x {est.views} views {_gib(est.activations)}) but "
            f"{_gib(room)} is available ({source}): {memory_advice(cfg, _what_fits(cfg, room // sharing, estimate))} "
            f"(train.preflight=false skips this check)")
    if not dist.is_main():
        return est
    name = cfg.preset or cfg.model.arch
    # A run short even at 10 GFLOP/s (a slow CPU's matmul) needs no measurement of this one's speed.
    if device.type == "cpu" and est.flops * cfg.train.steps > 10e9 * CPU_WARN_HOURS * 3600:
        rate = cpu_flops or matmul_flops_per_s()
        step_s = est.flops / rate
        if step_s * cfg.train.steps > CPU_WARN_HOURS * 3600:
            say(f"{name} is sized for a GPU: one step is {est.flops / 1e12:.2f} TFLOP, at least {_duration(step_s)} "
                f"at this CPU's matmul speed ({rate / 1e9:.0f} GFLOP/s), so {cfg.train.steps} steps take at least "
                f"{_duration(step_s * cfg.train.steps)}; on a CPU try --preset demo or --preset fmnist")
    if cfg.data.source == "builtin":
        upscaled = cfg.views.global_size > 2 * dataset.resolution
        if upscaled or cfg.train.steps * cfg.train.batch_size > TOY_EPOCHS * len(dataset):
            scaled = f", upscaled to {cfg.views.global_size} px" if upscaled else ""
            say(f"{name} is about to train on the built-in toy shapes ({len(dataset)} images of "
                f"{dataset.resolution} px{scaled}), a smoke test rather than pretraining: give your images with "
                f"--data (lejepa data prepare IMAGES --out DIR, or lejepa data fetch NAME)")
    return est
