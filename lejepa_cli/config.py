"""Typed, validated configuration: defaults <- preset YAML <- `key.sub=value` overrides.

Every field carries its default and a one-line meaning; `validate()` rejects bad values with a
message that names the key. The resolved config is saved as YAML in the run folder and as JSON
inside every checkpoint, so a run can always be rebuilt from its artefacts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lejepa_cli.errors import UserError


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin", an IDX folder, an .npz file, or a prepared folder
    train_split: str = "train"  # split used for pretraining (prepared / IDX data)
    eval_split: str = "val"  # held-out split for the online probe's report
    builtin_train: int = 4096  # images generated for the built-in dataset's train split
    builtin_val: int = 1024  # and for its held-out split
    builtin_size: int = 32  # side of the built-in images in pixels
    val_fraction: float = 0.0  # >0: hold out this fraction of train (seeded by the data) when the source has no eval_split


@dataclass
class ViewsConfig:
    global_views: int = 2  # Vg: views every view regresses to (their mean is the centre)
    local_views: int = 6  # Vl: small crops; 0 for CNN presets
    global_size: int = 224  # pixels of a global view
    local_size: int = 96  # pixels of a local view
    global_scale: tuple[float, float] = (0.3, 1.0)  # random-resized-crop area fraction
    local_scale: tuple[float, float] = (0.05, 0.3)
    ratio: tuple[float, float] = (0.75, 1.3333333)  # crop aspect-ratio range
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: int = 128  # of 255
    # Sensor corruptions (lejepa_cli/image/corruptions.py), all off by default: probability, strength range.
    noise_p: float = 0.0  # Gaussian noise
    noise_std: tuple[float, float] = (0.02, 0.2)  # its std, pixels in [0, 1]
    shot_noise_p: float = 0.0  # signal-dependent (Poisson-like) noise
    shot_noise_std: tuple[float, float] = (0.05, 0.3)  # its std at white (s * sqrt(x) at x)
    brightness_shift_p: float = 0.0  # additive brightness offset
    brightness_shift: tuple[float, float] = (-0.5, 0.5)  # the offset, pixels in [0, 1]
    contrast_shift_p: float = 0.0  # blend towards the image's mean grey
    contrast_shift: tuple[float, float] = (0.15, 0.6)  # the factor (0: flat grey, 1: unchanged)
    jpeg_p: float = 0.0  # JPEG-like 8x8 block DCT quantisation
    jpeg_quality: tuple[float, float] = (10.0, 60.0)  # libjpeg quality, 1..100
    dead_pixel_p: float = 0.0  # stuck dark / hot sensor pixels
    dead_pixel_fraction: tuple[float, float] = (0.001, 0.02)  # fraction of pixels stuck
    corrupt_views: str = "all"  # which views the corruptions may hit: all | global | local


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_nano|vit_micro|vit_tiny|vit_small|vit_base|vit_large|vit_huge|resnet_micro|resnet18|resnet50
    patch_size: int = 16  # ViT patch side in pixels
    drop_path: float = 0.1  # stochastic depth rate (ViTs)
    small_stem: bool = False  # ResNet: 3x3 stem (stride stem_stride) without max-pool for 28-32 px images
    stem_stride: int = 1  # ResNet small stem's stride: 2 halves every feature map (~3x faster at 28 px)
    head_width: int = 0  # ResNet: 1x1 conv + BN + ReLU widening the last feature map to this many channels (0: none)
    proj_hidden: int = 2048  # projector MLP hidden width
    proj_dim: int = 128  # projector output K (SIGReg dimension)
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory


@dataclass
class LossConfig:
    lamb: float = 0.05  # lambda: weight of SIGReg, (1 - lambda) weighs the prediction term
    num_slices: int = 1024  # M: random directions per step
    t_max: float = 3.0  # integration range [0, t_max] of the Epps-Pulley statistic (doubled)
    num_knots: int = 17  # trapezoid knots on [0, t_max]


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings, CLS token
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warmup steps; 0 means 10% of train.steps
    min_lr_ratio: float = 1e-3  # cosine decays to lr * min_lr_ratio
    probe_lr: float = 1e-3  # online linear probe learning rate
    grad_clip: float = 0.0  # clip the gradient's global norm to this before each step (0: off; LeWM: 1.0)


@dataclass
class TrainConfig:
    steps: int = 1000  # total optimizer steps
    batch_size: int = 128  # images per optimizer step, over all processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    save_every: int = 500  # checkpoint period in steps (a final checkpoint is always written)
    keep_last: int = 3  # checkpoints kept in the run folder (older ones are deleted)
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere)|fp32|bf16
    compile: bool = False  # torch.compile the encoder
    fsdp: bool = False  # torchrun: shard ViT weights, grads and optimizer state over processes (FSDP2)
    online_probe: bool = True  # train a linear probe on detached features when labels exist
    eval_every: int = 0  # kNN evaluation on held-out data every N steps (0: only at the end)
    on_nonfinite: str = "stop"  # stop|skip: what a NaN/inf loss does
    # estimate one step's memory before training and refuse when it cannot fit (lejepa_cli/preflight.py);
    # false skips the check and its warnings, e.g. when swap or a pessimistic estimate should not stop a run
    preflight: bool = True


@dataclass
class LogConfig:
    every: int = 10  # steps between metrics.jsonl lines (values are read from the device only then)
    tensorboard: bool = False  # also log to TensorBoard (if installed)
    wandb: bool = False  # also log to Weights & Biases (if installed)
    wandb_project: str = "lejepa"


@dataclass
class WorldConfig:
    """The world-model objective (objective: world): frames, latents, windows, predictor and evaluation."""

    frame_size: int = 224  # side in pixels frames are resized to before the encoder (LeWM: 224)
    latent_dim: int = 128  # latent width D: SIGReg's dimension and the predictor's token width (LeWM: 192)
    history: int = 3  # H: latents the predictor sees (its context; LeWM: 3)
    num_preds: int = 1  # each history position predicts the latent this many window frames ahead
    rollout_steps: int = 1  # open-loop steps in the loss: predictions fed back as context, as the planner does (1: LeWM's)
    frameskip: int = 5  # simulator steps between window frames; the actions in one skip are concatenated
    depth: int = 6  # predictor transformer blocks (LeWM: 6)
    heads: int = 16  # attention heads per block (LeWM: 16)
    head_dim: int = 64  # width of one head (LeWM: 64)
    mlp_dim: int = 2048  # hidden width of each block's MLP (LeWM: 2048)
    dropout: float = 0.1  # predictor dropout (LeWM: 0.1)
    eval_windows: int = 512  # held-out windows for the rollout evaluation (0: every one)
    eval_horizon: int = 5  # open-loop rollout steps reported at each evaluation
    camera_views: int = 0  # corrupted copies of each training window beside the clean one (0: clean frames only)
    camera_noise: float = 0.0  # pixel noise std of a copy, drawn in [0, this] per window ([0, 1] pixel units)
    camera_hue: float = 0.0  # hue rotation of a copy, drawn in [-this, this] degrees per window
    camera_colour: float = 0.0  # brightness offset and per-channel gain change of a copy, each in [-this, this]
    camera_invariance: float = 1.0  # weight of the term pulling every copy's latents to the copies' mean
    camera_target: str = "clean"  # clean: prediction and SIGReg on the clean windows only | all: on every copy too
    camera_from_step: int = 0  # training step the copies join at (before it: clean windows only)
    camera_frames: int = 0  # frames of each window copied, picked at random (0: every frame; k: k frames, ~k / T the cost)
    freeze_dynamics: bool = False  # keep the predictor and action encoder fixed: only the encoder learns (adaptation)

PLAN_COSTS = ("final", "min")


@dataclass
class PlanConfig:
    """A world model's planner, CEM in latent space (`lejepa world plan | stress`, the world recipes read
    the run's): the best setting measured on two-room; LeWM's CEM is the `lewm` profile (world/plan_settings.py)."""

    candidates: int = 150  # action sequences sampled per CEM iteration (LeWM: 300)
    iterations: int = 5  # CEM iterations per decision (LeWM: 30); the plan is warm-started from the last one
    elites: int = 15  # cheapest candidates each iteration refits to (LeWM: 30)
    horizon: int = 40  # ENVIRONMENT steps planned ahead: ceil(horizon / world.frameskip) action blocks (LeWM: 25)
    cost: str = "min"  # final: latent distance to the goal after the last block (LeWM's) | min: the nearest any block gets
    noise_beta: float = 2.0  # temporal colour of the sampling noise: 0 white (LeWM's), 2 about a random walk (iCEM)
    budget: int = 50  # environment steps an episode may take to reach its goal
    goal_offset: int = 25  # goals: where the exploration policy is this many steps after the start (0: anywhere)


@dataclass
class Config:
    preset: str = ""  # name of the preset this config started from
    objective: str = "image"  # image (LeJEPA views of images) | world (action-conditioned world model)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


from lejepa_cli.models import ARCHS  # noqa: E402  (one list of architectures)

# Allowed values: key -> (predicate, what is allowed).
_RULES: dict[str, tuple[Any, str]] = {
    "views.local_views": (lambda v: v >= 0, "an integer >= 0"),
    "views.global_size": (lambda v: v >= 8, "an integer >= 8"),
    "views.local_size": (lambda v: v >= 4, "an integer >= 4"),
    "views.global_scale": (lambda v: 0 < v[0] <= v[1] <= 1, "two numbers 0 < lo <= hi <= 1"),
    "views.local_scale": (lambda v: 0 < v[0] <= v[1] <= 1, "two numbers 0 < lo <= hi <= 1"),
    "views.ratio": (lambda v: 0 < v[0] <= v[1], "two numbers 0 < lo <= hi"),
    "views.blur_sigma": (lambda v: 0 < v[0] <= v[1], "two numbers 0 < lo <= hi"),
    "views.brightness": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "views.contrast": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "views.saturation": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "views.hue": (lambda v: 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "views.solarize_threshold": (lambda v: 0 <= v <= 255, "an integer in [0, 255]"),
    **{f"views.{k}_p": (lambda v: 0 <= v <= 1, "a probability in [0, 1]") for k in (
        "flip", "jitter", "grayscale", "blur", "solarize", "noise", "shot_noise", "brightness_shift",
        "contrast_shift", "jpeg", "dead_pixel")},
    "views.noise_std": (lambda v: 0 <= v[0] <= v[1] <= 1, "two numbers 0 <= lo <= hi <= 1"),
    "views.shot_noise_std": (lambda v: 0 <= v[0] <= v[1] <= 1, "two numbers 0 <= lo <= hi <= 1"),
    "views.brightness_shift": (lambda v: -1 <= v[0] <= v[1] <= 1, "two numbers -1 <= lo <= hi <= 1"),
    "views.contrast_shift": (lambda v: 0 <= v[0] <= v[1] <= 1, "two numbers 0 <= lo <= hi <= 1"),
    "views.jpeg_quality": (lambda v: 1 <= v[0] <= v[1] <= 100, "two numbers 1 <= lo <= hi <= 100"),
    "views.dead_pixel_fraction": (lambda v: 0 <= v[0] <= v[1] <= 1, "two numbers 0 <= lo <= hi <= 1"),
    "views.corrupt_views": (lambda v: v in ("all", "global", "local"), "one of all, global, local"),
    "model.arch": (lambda v: v in ARCHS, "one of " + ", ".join(ARCHS)),
    "model.drop_path": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.stem_stride": (lambda v: v in (1, 2), "1 or 2"),
    "model.head_width": (lambda v: v >= 0, "an integer >= 0 (0: no head)"),
    "loss.lamb": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "loss.t_max": (lambda v: v > 0, "a number > 0"),
    "loss.num_knots": (lambda v: v >= 2, "an integer >= 2"),
    "optim.lr": (lambda v: v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    **{key: (lambda v: 0 <= v <= 1, "a number in [0, 1]") for key in (
        "optim.min_lr_ratio", "world.camera_noise", "world.camera_colour")},
    "optim.probe_lr": (lambda v: v > 0, "a number > 0"),
    "optim.grad_clip": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "train.batch_size": (lambda v: v >= 2, "an integer >= 2 (SIGReg needs a batch)"),
    "train.precision": (lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
    "train.device": (lambda v: v in ("auto", "cpu", "mps", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
                     "auto, cpu, cuda, cuda:N or mps"),
    "train.seed": (lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "train.eval_every": (lambda v: v >= 0, "an integer >= 0"),
    "train.on_nonfinite": (lambda v: v in ("stop", "skip"), "stop or skip"),
    "objective": (lambda v: v in ("image", "world"), "image or world"),
    "world.frame_size": (lambda v: v >= 8, "an integer >= 8"),
    **{key: (lambda v: v >= 1, "an integer >= 1") for key in (
        "views.global_views", "model.patch_size", "model.proj_hidden", "model.proj_dim", "loss.num_slices", "train.steps",
        "train.grad_accum", "train.save_every", "train.keep_last", "log.every", "data.builtin_val",
        "world.latent_dim", "world.history", "world.num_preds", "world.rollout_steps", "world.frameskip", "world.depth", "world.heads",
        "world.head_dim", "world.mlp_dim", "world.eval_horizon", "plan.candidates", "plan.iterations", "plan.elites",
        "plan.horizon", "plan.budget")},
    "world.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    **{key: (lambda v: v >= 0, "a number >= 0") for key in (
        "world.camera_views", "world.camera_invariance", "world.camera_from_step", "world.camera_frames")},
    "world.camera_hue": (lambda v: 0 <= v <= 180, "a number of degrees in [0, 180]"),
    "world.camera_target": (lambda v: v in ("clean", "all"), "clean or all"),
    "world.eval_windows": (lambda v: v >= 0, "an integer >= 0 (0: every held-out window)"),
    "plan.cost": (lambda v: v in PLAN_COSTS, "one of " + ", ".join(PLAN_COSTS)),
    "plan.noise_beta": (lambda v: 0 <= v <= 4, "a number in [0, 4] (0: white noise, 2: about a random walk)"),
    "plan.goal_offset": (lambda v: v >= 0, "an integer >= 0 (0: goals anywhere)"),
    "data.builtin_train": (lambda v: v >= 2, "an integer >= 2"),
    "data.builtin_size": (lambda v: v >= 8, "an integer >= 8"),
    "data.val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1) (0: no held-out split carved)"),
}


def validate(cfg: Config) -> Config:
    """Check every key (UserError naming the first bad one); a world config's old key names are
    read first (see `read_world_renames`)."""
    read_world_renames(cfg)
    for key, (ok, allowed) in _RULES.items():
        if not ok(get_key(cfg, key)):
            raise UserError(f"config key '{key}' = {get_key(cfg, key)!r} is not allowed: expected {allowed}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise UserError(f"config key 'train.batch_size' = {cfg.train.batch_size} must be divisible by "
                        f"'train.grad_accum' = {cfg.train.grad_accum}")
    if cfg.plan.elites > cfg.plan.candidates:
        raise UserError(f"config key 'plan.elites' = {cfg.plan.elites} must be at most "
                        f"'plan.candidates' = {cfg.plan.candidates} (the elites are the cheapest candidates)")
    if cfg.model.stem_stride != 1 and not (cfg.model.small_stem and cfg.model.arch.startswith("resnet")):
        raise UserError(f"config key 'model.stem_stride' = {cfg.model.stem_stride} sets the stride of a ResNet's "
                        f"small stem: it needs a ResNet model.arch and model.small_stem=true")
    if cfg.model.head_width and not cfg.model.arch.startswith("resnet"):
        raise UserError(f"config key 'model.head_width' = {cfg.model.head_width} widens a ResNet's last feature map: "
                        f"it needs a ResNet model.arch (set it to 0 for a ViT)")
    if cfg.objective == "world" and (cfg.train.fsdp or cfg.train.grad_accum > 1):
        raise UserError("objective 'world' trains with DDP and one micro-batch: set train.fsdp=false and train.grad_accum=1")
    w = cfg.world
    if w.rollout_steps > 1 and w.num_preds != 1:
        raise UserError(f"config key 'world.rollout_steps' = {w.rollout_steps} needs world.num_preds 1, not {w.num_preds}")
    window = w.history + w.num_preds + w.rollout_steps - 1  # frames per training window
    if w.camera_frames and (w.camera_target != "clean" or w.camera_frames > window):
        raise UserError(f"config key 'world.camera_frames' = {w.camera_frames} copies single frames, which the predictor "
                        f"cannot score: it needs world.camera_target clean and at most the window's {window} frames")
    if cfg.train.fsdp and not cfg.model.arch.startswith("vit"):
        raise UserError(f"config key 'train.fsdp' = True shards transformer blocks: it needs a ViT "
                        f"model.arch, not {cfg.model.arch!r} (ResNets train with DDP)")
    return cfg


# ---- a world's keys under their old names ----------------------------------------------------------

# Older world configs (presets, user YAML, --set, configs saved in checkpoints) give the frame size and
# latent width with image pretraining's keys; `read_world_renames` reads them. New key -> its old name.
WORLD_RENAMES = {"world.frame_size": "views.global_size", "world.latent_dim": "model.proj_dim"}
_noted: set[str] = set()  # old names already reported by this process


def _sources(cfg: Config) -> dict[str, int]:
    """Dotted key -> number of the source (preset, saved config, --set list) that last set it."""
    return cfg.__dict__.setdefault("_key_sources", {})


def _begin_source(cfg: Config) -> None:
    """Keys set from now on come from a later source than those set so far."""
    cfg.__dict__["_source"] = cfg.__dict__.get("_source", 0) + 1


def _put(cfg: Config, key: str, value: Any) -> None:
    section, _, last = key.rpartition(".")
    setattr(get_key(cfg, section) if section else cfg, last, value)


def read_world_renames(cfg: Config) -> None:
    """objective world: each WORLD_RENAMES key takes its old name's value where a later source than
    its own (or only the old name) set it, with a note once per process; one source that sets both
    to different values is a UserError. The old names then mirror the new keys, so a saved config
    agrees with itself and with older readers. Image configs are left as they are."""
    if cfg.objective != "world":
        return
    sources, read = _sources(cfg), []
    for new, old in WORLD_RENAMES.items():
        if old in sources and sources[old] == sources.get(new):
            if get_key(cfg, old) != get_key(cfg, new):
                raise UserError(f"config keys '{old}' = {get_key(cfg, old)!r} and '{new}' = {get_key(cfg, new)!r} "
                                f"disagree: '{old}' is the old name of '{new}' for objective world; set only '{new}'")
        elif old in sources and sources[old] > sources.get(new, -1):
            _put(cfg, new, get_key(cfg, old))
            read.append((old, new))
        _put(cfg, old, get_key(cfg, new))
    fresh = [f"{old} = {get_key(cfg, new)} as {new}" for old, new in read if old not in _noted]
    _noted.update(old for old, _ in read)
    if fresh and os.environ.get("RANK", "0") == "0":  # one line per job, not one per torchrun process
        print(f"note: objective world reads {' and '.join(fresh)} (the keys' old names)", file=sys.stderr)


# ---- building a config -------------------------------------------------------------------------


def preset_dir() -> Path:
    """Presets ship inside the installed package (lejepa_cli/presets, from the repo's presets/)."""
    packaged = resources.files("lejepa_cli") / "presets"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "presets"  # source checkout without install


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path  # a user's own preset file
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(list_presets())} or give a .yaml file")
    return path


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults <- preset <- overrides, validated."""
    cfg = Config()
    if preset:
        path = preset_path(preset)
        from lejepa_cli.data.inputs import load_yaml

        tree = load_yaml(path, "preset (YAML)") or {}
        if not isinstance(tree, dict):
            raise UserError(f"preset {path} must be a mapping of sections")
        _begin_source(cfg)
        merge_tree(cfg, tree)
        cfg.preset = tree.get("preset", path.stem) if isinstance(tree.get("preset"), str) else path.stem
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`key.sub=value` items (values read as YAML scalars) set on `cfg`, then validated."""
    _begin_source(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} must look like key.sub=value (e.g. train.steps=100)")
        set_key(cfg, key.strip(), _parse_scalar(raw))
    return validate(cfg)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint or run folder."""
    cfg = Config()
    _begin_source(cfg)
    merge_tree(cfg, tree)
    return validate(cfg)


def merge_tree(cfg: Config, tree: dict[str, Any], prefix: str = "") -> None:
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            merge_tree(cfg, value, full + ".")
        else:
            set_key(cfg, full, value)


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def get_key(cfg: Config, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def set_key(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(fields) if fields else "nothing (it is not a section)"
            raise UserError(f"unknown config key '{key}': '{part}' is not in {where} (allowed: {allowed})")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(node))[part]
            if dataclasses.is_dataclass(hint):
                raise UserError(f"config key '{key}' is a section: set one of its keys, e.g. {key}.<name>=...")
            setattr(node, part, _coerce(key, value, hint))
            _sources(cfg)[key] = cfg.__dict__.get("_source", 0)
        else:
            node = getattr(node, part)


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        kinds = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(kinds):
            raise UserError(f"config key '{key}' = {value!r} must be a list of {len(kinds)} numbers, e.g. [0.3, 1.0]")
        return tuple(_coerce(key, v, k) for v, k in zip(value, kinds))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")  # not used by the config tree
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string, not a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan are valid YAML floats but no valid setting
                raise UserError(f"config key '{key}' = {value!r} is not allowed: expected a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise UserError(f"config key '{key}' = {value!r} has the wrong type: expected {names.get(hint, hint)}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
