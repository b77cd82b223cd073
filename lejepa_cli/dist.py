"""Multi-process training on torch.distributed: ranks, collectives, process group, model sharding.

One process and many share one code path: every helper here works without torch.distributed
being initialised (rank 0 of a world of 1, collectives are identities, wrappers do nothing).
Under torchrun:

    torchrun --nproc_per_node 2 -m lejepa_cli train --preset demo   # gloo on CPU, NCCL on CUDA

- `setup()` joins the process group with a timeout (LEJEPA_DIST_TIMEOUT seconds, default 600)
  so a dead or hung rank ends the job with an error instead of hanging it.
- `all_reduce_mean` is autograd-aware: SIGReg's ECF and BatchNorm statistics are those of the
  global batch, values and gradients (see docs/method.md section 4.4).
- `global_batchnorm` makes every BatchNorm use global-batch statistics: SyncBatchNorm on CUDA,
  `GlobalBatchNorm*d` (all_reduce_mean of mean and variance) on other devices.
- `shard` applies FSDP2 (`fully_shard`) to a ViT's blocks and root; `full_state_dict`,
  `full_optimizer_state_dict` and the `load_*` pair move whole (unsharded) state in and out,
  so checkpoints are the same single file whatever the world size or sharding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lejepa_cli.errors import UserError

# ---- ranks and collectives ----------------------------------------------------------------------


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _launched_world() -> int:
    """WORLD_SIZE as set by the launcher (torchrun, or by hand for srun); 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank; the launcher's RANK before setup() and after teardown()."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # Outside the group's lifetime (e.g. the CLI printing its summary after train()), rank 1
    # of a torchrun job must still not behave as the main process.
    return int(os.environ.get("RANK", "0")) if _launched_world() > 1 else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's index on its node (torchrun sets LOCAL_RANK); 0 on one process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process prints, logs and writes files."""
    return rank() == 0


def select_device(name: str, option: str = "--device") -> torch.device:
    """The device `name` asks for: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps.

    A bare cuda (and auto on a CUDA machine) is this process's GPU, cuda:LOCAL_RANK, so each
    torchrun process gets its own. An unavailable or unknown device is a UserError naming
    `option`, the setting the user gave it by: a command option (--device) or a config key
    (train.device).
    """
    def asked(value: str) -> str:  # how the user writes it: "--device cpu" or "train.device=cpu"
        return f"{option} {value}" if option.startswith("-") else f"{option}={value}"

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{asked(name)}: CUDA is not available here; use {asked('cpu')} or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{asked('mps')}: MPS is not available here; use {asked('cpu')} or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank())
    try:
        return torch.device(name)
    except RuntimeError:  # a command's --device is free text
        raise UserError(f"unknown device '{name}' ({option}): use auto, cpu, cuda, cuda:N or mps") from None


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` across ranks, differentiable; returns the reduced tensor (identity on one rank).

    The autograd-aware all-reduce sums the incoming gradients in backward, so each rank's
    gradient is world_size x its share of the global loss's gradient; DDP's gradient
    averaging then yields exactly the single-process gradient on the global batch.
    A plain `dist.all_reduce` would leave the gradient world_size times too small.
    """
    if not is_distributed():
        return t
    # Imported lazily: the module pulls in RPC machinery not needed on one process.
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # Deprecated in favour of functional collectives, whose all_reduce has no autograd.
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM) / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_gloo_side_group: Any = None  # for host-side flags when the default group is NCCL


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (a collective: all ranks call it).

    Goes through gloo on host memory, so under NCCL it does not wait for the device.
    """
    global _gloo_side_group
    if not is_distributed():
        return flag
    group = None  # the default group, when it is gloo
    if dist.get_backend() != "gloo":
        if _gloo_side_group is None:  # every rank creates it at the same call, as new_group requires
            _gloo_side_group = dist.new_group(backend="gloo", timeout=timeout())
        group = _gloo_side_group
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


# ---- process group ------------------------------------------------------------------------------


def timeout() -> timedelta:
    """How long any collective may wait for the other ranks: LEJEPA_DIST_TIMEOUT seconds (default 600)."""
    raw = os.environ.get("LEJEPA_DIST_TIMEOUT", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"LEJEPA_DIST_TIMEOUT = {raw!r} must be a number of seconds > 0")
    return timedelta(seconds=seconds)


def setup(device: torch.device | None = None) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); True if this call created it.

    NCCL when training on CUDA (`device`, or CUDA being available when it is None), gloo
    otherwise. The timeout bounds every collective: a rank that died or hangs turns into an
    error on the others (NCCL's watchdog aborts them; gloo raises) instead of a silent hang;
    torchrun then stops the whole job and names the failed rank.
    """
    if _launched_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(device if device is not None and device.index is not None else local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout())
    return True


def teardown() -> None:
    global _gloo_side_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # and every group made from it
    _gloo_side_group = None


# ---- BatchNorm over the global batch ------------------------------------------------------------


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the mean and variance over every rank's batch.

    With equal per-rank batches (the sampler guarantees them) the global mean is the mean of the
    rank means, and the global (biased) variance the mean of the ranks' squared deviations from
    it; both go through the autograd-aware `all_reduce_mean`, so values, gradients and running
    statistics equal those of one process holding the global batch. Two passes (mean, then
    centred squares) keep float32 exact where E[x^2] - E[x]^2 would cancel. On one process, and
    in eval mode, it is plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # every dim but channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> float32; float64 stays
        mean = all_reduce_mean(xf.mean(dims))  # (C,)
        centred = xf - mean.view(shape)
        var = all_reduce_mean(centred.square().mean(dims))  # (C,) biased, used to normalise
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), count=x.numel() // x.shape[1] * world_size())
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # Same rule as nn.BatchNorm: momentum (None = cumulative average), unbiased variance.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d with global-batch statistics in a process group (same parameters and buffers)."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d with global-batch statistics in a process group (same parameters and buffers)."""


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm in `module` use global-batch statistics; a no-op on one process.

    CUDA: `nn.SyncBatchNorm` (fused kernels). Elsewhere (CPU / gloo, where SyncBatchNorm raises):
    the layers become `GlobalBatchNorm1d/2d` in place. Parameters, buffers and state-dict keys are
    unchanged either way, so checkpoints and exports do not depend on it. Returns the module.
    """
    if not is_distributed():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        # Swapping the class keeps the layer's parameters, buffers and identity; the subclasses add no state.
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module


# ---- data parallel wrappers ---------------------------------------------------------------------


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` in a process group; `module` itself on one process."""
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def shard(module: nn.Module, blocks: Iterable[nn.Module], methods: Iterable[str] = ()) -> None:
    """FSDP2: shard each of `blocks`, then `module` (the root: everything outside the blocks).

    Parameters, gradients and optimizer state then live 1/world on each rank; a block's weights
    are all-gathered just before it runs and freed after (again in backward). Must run before
    the optimizer is built. `methods` are extra entry points besides forward (probe_features)
    that must gather the root's weights too.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in blocks:
        fully_shard(block)
    # The root's few weights (patch embedding, position embeddings, final norm) stay gathered
    # from forward to backward instead of being gathered twice.
    fully_shard(module, reshard_after_forward=False)
    for name in methods:
        register_fsdp_forward_method(module, name)
    # Our modules return views of their outputs (reshape) and never modify them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    if not is_distributed():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    return bool(_fsdp_modules(module))


@contextmanager
def no_grad_sync(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce / reduce-scatter) for micro-batches before the last.

    DDP: its `no_sync()`. FSDP2: `set_requires_gradient_sync(False)` on every sharded submodule.
    Nothing on one process or when `enabled` is False.
    """
    if not enabled or not is_distributed():
        yield
        return
    module = getattr(module, "_orig_mod", module)  # under torch.compile
    if isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    sharded = _fsdp_modules(module)
    for m in sharded:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)


# ---- whole state in and out of sharded modules --------------------------------------------------


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with sharded tensors gathered whole (a collective under FSDP).

    Under FSDP every rank must call it; the gathered tensors land on rank 0's CPU and the other
    ranks get an empty dict (only rank 0 writes checkpoints).
    """
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict; under FSDP each rank keeps its shard of it."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(strict=True))


def _param_ids(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, int]]:
    """A container of `modules` and its parameter names -> the optimizer's integer parameter ids."""
    container = nn.ModuleDict(modules)
    names = {id(p): n for n, p in container.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return container, {names[id(p)]: i for i, p in enumerate(params)}


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """`optimizer.state_dict()` (integer parameter ids) with sharded state gathered whole.

    `modules` (name -> module) must hold every parameter of the optimizer. Under FSDP this is a
    collective; rank 0 gets the state on its CPU and the other ranks an empty state. The result
    is what the same optimizer on one unsharded process would return, so a checkpoint resumes
    with or without FSDP and on any world size.
    """
    if not any(is_sharded(m) for m in modules.values()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    container, ids = _param_ids(optimizer, modules)
    by_name = get_optimizer_state_dict(container, optimizer, options=_options(cpu_offload=True))
    if not by_name:  # ranks other than 0
        return {"state": {}, "param_groups": []}
    # The gathered state is keyed by parameter name; checkpoints use the optimizer's own ids.
    return {
        "state": {ids[name]: s for name, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [ids[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }


def load_full_optimizer_state_dict(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], modules: dict[str, nn.Module]
) -> None:
    """Load a whole `optimizer.state_dict()`-format state; under FSDP each rank keeps its shard."""
    if not any(is_sharded(m) for m in modules.values()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    container, ids = _param_ids(optimizer, modules)
    names = {i: name for name, i in ids.items()}
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(container, optimizer, by_name, options=_options())
