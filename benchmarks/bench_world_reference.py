"""LeWM's own code beside ours, at LeWM's sizes, in one run: training step and one CEM decision.

    /tmp/swm-venv/bin/python -m benchmarks.bench_world_reference --threads 1 --threads 2   # about 10 minutes
    python -m benchmarks.bench_world --reference ...                                      # the same, inside bench_world
    /tmp/swm-venv/bin/python -m benchmarks.bench_world_reference --profile --threads 1    # both train steps profiled

The reference is stable-worldmodel 0.1.1's `LeWM`, `Predictor`, `Embedder`, `MLP`, `SIGReg` and
`CEMSolver`, with HF transformers' ViT as LeWM's encoder (what stable-pretraining's `vit_hf("tiny",
patch_size=14, image_size=224, use_mask_token=False)` builds, as le-wm's model config asks). It is
never a dependency of the package or of CI: stable-worldmodel pulls torchvision and a CUDA torch.
Install it in a separate environment, the CPU torch first:

    python -m venv /tmp/swm-venv
    /tmp/swm-venv/bin/pip install torch==2.13.0                      # the CPU wheel (never an unpinned torch)
    /tmp/swm-venv/bin/pip install --no-deps stable-worldmodel==0.1.1
    /tmp/swm-venv/bin/pip install numpy einops gymnasium loguru "transformers>=4.50" \\
        typer rich pyyaml safetensors pillow matplotlib               # its model/solver imports + ours

`import stable_worldmodel` runs its package __init__, which imports its data, environment and
policy modules (lancedb, torchvision, ...). `load_reference` loads only the files the benchmark
needs (wm/lewm/lewm.py, wm/lewm/module.py, wm/loss.py, solver/cem.py and what they import:
einops, gymnasium, loguru) by registering the two parent packages without running their __init__.
Without stable_worldmodel `run()` reports ours only and says why.

Same sizes on both sides, from the `lewm` preset (ViT-Tiny/14 at 224 px, 6-block predictor, 16
heads of 64, MLP 2048, latent 192, projectors 192-2048-192 with BatchNorm, history 3, frameskip 5,
2-D actions, dropout 0.1, fp32), the same inputs (normalised float frames: both sides' data
pipelines run before the step), the same seed. Measures:

- train step: encode 4 frames per window, predict from the first 3, prediction loss + lambda
  SIGReg (1024 directions, 17 knots), backward, clip the gradient norm to 1, AdamW, at --batch 16.
  The reference's step is le-wm's `lejepa_forward` and Lightning's clip and step; ours is
  `WorldRun.step` and the train loop's update.
- one CEM decision at LeWM's setting (300 candidates x 30 iterations, top 30, horizon 5 blocks):
  the reference's `CEMSolver.solve` on `LeWM.get_cost` with `history_len` 1 (PlanConfig's default
  and LeWM's evaluation: 5 predictor calls on windows of 1, 2, 3, 3, 3 latents); ours
  `plan.cem` on `plan.model_cost` (world/rollout.py) from 1 context latent (the same work: the
  start of an episode) and from 3 (every later decision of `world plan`). A full decision costs
  ~25 s on one thread, so --iterations (default 3) are timed and scaled:
  decision = encode + 30 / iterations x (timed - encode), the encoding of the context and goal
  frames timed apart; the JSON says so.

Reference and ours are timed interleaved (one repeat of each in turn), so a load that changes
during the run hits both; medians over --repeats, and the ratio reference / ours (above 1: ours is
faster). The machine's load average is in "machine".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function

from benchmarks.bench_world import world_train_step
from benchmarks.machine import describe
from lejepa_cli.config import load_config
from lejepa_cli.optim import adamw, param_groups
from lejepa_cli.world.export import WorldModelExport, model_spec
from lejepa_cli.world.objective import build_world_model
from lejepa_cli.world.plan import cem, model_cost
from lejepa_cli.world.plan_settings import CEMConfig

PRESET, ACTION_DIM, REFERENCE_VERSION = "lewm", 2, "0.1.1"
VIT_TINY = {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768}
REFERENCE_FILES = ("stable_worldmodel.wm.lewm.lewm", "stable_worldmodel.wm.lewm.module", "stable_worldmodel.wm.loss",
                   "stable_worldmodel.solver.cem")
LEWM_SIGREG_WEIGHT = 0.09  # le-wm's config (ours: the preset's loss.lamb; the weight does not change the time)


def load_reference() -> tuple[types.SimpleNamespace | None, str]:
    """stable-worldmodel's LeWM classes and CEM solver, or None and why not.

    Loads the four files the benchmark uses with the package and its `wm` and `solver`
    subpackages registered bare (their __init__ would import torchvision, lancedb, the environments).
    """
    spec = importlib.util.find_spec("stable_worldmodel")
    if spec is None or not spec.submodule_search_locations:
        return None, "stable_worldmodel is not importable in this environment (see the module docstring to install it)"
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (("stable_worldmodel", root), ("stable_worldmodel.wm", root / "wm"),
                         ("stable_worldmodel.solver", root / "solver")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            package.__spec__.submodule_search_locations = [str(folder)]  # find_spec works on it again
            package.__path__, package.__package__ = [str(folder)], name
            sys.modules[name] = package
    try:
        lewm, module, loss, solver = (importlib.import_module(f) for f in REFERENCE_FILES)
        from transformers import ViTConfig, ViTModel  # LeWM's encoder
    except ImportError as e:
        return None, f"stable_worldmodel is installed but its model/solver files do not import: {e}"
    version = importlib.metadata.version("stable-worldmodel")
    return types.SimpleNamespace(LeWM=lewm.LeWM, Predictor=module.Predictor, Embedder=module.Embedder, MLP=module.MLP,
                                 SIGReg=loss.SIGReg, CEMSolver=solver.CEMSolver, ViTConfig=ViTConfig,
                                 ViTModel=ViTModel, version=version), version


def reference_model(ref: types.SimpleNamespace, cfg) -> nn.Module:
    """LeWM as le-wm's config/train/model/lewm.yaml builds it, at the preset's sizes."""
    w, d = cfg.world, cfg.world.latent_dim
    encoder = ref.ViTModel(ref.ViTConfig(**VIT_TINY, image_size=w.frame_size, patch_size=cfg.model.patch_size),
                           add_pooling_layer=False, use_mask_token=False)
    encoder.config.interpolate_pos_encoding = True
    predictor = ref.Predictor(num_frames=w.history, depth=w.depth, heads=w.heads, mlp_dim=w.mlp_dim, input_dim=d,
                              hidden_dim=d, output_dim=d, dim_head=w.head_dim, dropout=w.dropout, emb_dropout=0.0)
    action_encoder = ref.Embedder(input_dim=w.frameskip * ACTION_DIM, emb_dim=d)
    projector = ref.MLP(d, cfg.model.proj_hidden, d, norm_fn=nn.BatchNorm1d)
    pred_proj = ref.MLP(d, cfg.model.proj_hidden, d, norm_fn=nn.BatchNorm1d)
    return ref.LeWM(encoder, predictor, action_encoder, projector, pred_proj)


def parameters(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def reference_train_step(ref, model: nn.Module, cfg) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """le-wm's lejepa_forward, backward, Lightning's gradient_clip_val 1.0 and AdamW (lr 5e-5, wd 1e-3)."""
    sigreg = ref.SIGReg(knots=cfg.loss.num_knots, num_proj=cfg.loss.num_slices)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    h, n = cfg.world.history, cfg.world.num_preds

    def step(frames: torch.Tensor, actions: torch.Tensor) -> None:
        out = model.encode({"pixels": frames, "action": actions})
        emb, act_emb = out["emb"], out["act_emb"]
        pred = model.predict(emb[:, :h], act_emb[:, :h])
        with record_function("sigreg"):  # the profile's labels, as in world_train_step
            loss = (pred - emb[:, n:]).pow(2).mean() + LEWM_SIGREG_WEIGHT * sigreg(emb.transpose(0, 1))
        loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def our_train_step(model: nn.Module, cfg) -> Callable[[torch.Tensor, torch.Tensor], None]:
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg, torch.device("cpu"))
    return lambda frames, actions: world_train_step(model, optimizer, cfg, frames, actions)


def reference_decision(ref, model: nn.Module, cfg, frames: torch.Tensor, goal: torch.Tensor,
                       iterations: int) -> Callable[[], None]:
    """CEMSolver.solve at LeWM's setting (iterations as asked) from `frames` (1, h, C, R, R)."""
    from gymnasium.spaces import Box

    w, search = cfg.world, CEMConfig()
    info = {"pixels": frames, "goal": goal, "action": torch.zeros(1, frames.shape[1], w.frameskip * ACTION_DIM)}

    def decide() -> None:
        solver = ref.CEMSolver(model, num_samples=search.candidates, n_steps=iterations, topk=search.elites,
                               var_scale=search.init_std, device="cpu", seed=0)
        solver.configure(action_space=Box(-1.0, 1.0, shape=(1, ACTION_DIM)), n_envs=1,
                         config=types.SimpleNamespace(horizon=search.horizon, action_block=w.frameskip))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its solve time
            solver.solve(dict(info))

    return decide


def our_decision(model: nn.Module, cfg, frames: torch.Tensor, goal: torch.Tensor, iterations: int) -> Callable[[], None]:
    """plan.cem on plan.model_cost (what `world plan` runs per decision) from `frames` (1, h, C, R, R)."""
    w = cfg.world
    a = w.frameskip * ACTION_DIM
    spec = {**model_spec(cfg.to_dict(), ACTION_DIM), "action_mean": [0.0] * ACTION_DIM, "action_std": [1.0] * ACTION_DIM}
    export = WorldModelExport(model, spec, (0.5,) * 3, (0.25,) * 3)
    search = dataclasses.replace(CEMConfig(), iterations=iterations)
    past = torch.zeros(1, frames.shape[1] - 1, a)

    @torch.no_grad()
    def decide() -> None:
        z_hist, z_goal = model.encode(frames), model.encode(goal)[:, 0]
        cem(model_cost(export, z_hist, past, z_goal, search.cost), 1, a, search, torch.Generator().manual_seed(0))

    return decide


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds of each function, timed in turn (one of each per round) after
    one warm-up each. On a loaded machine the wall time includes waiting for a core; at one thread the
    CPU time does not (at two, a thread spinning for its partner counts)."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _ratio(ref: float, ours: float) -> float:
    return round(ref / ours, 2)


def _models(ref, cfg) -> dict[str, nn.Module]:
    """Ours (build_world_model of the preset) and the reference's, each from seed 0."""
    torch.manual_seed(0)
    models = {"ours": build_world_model(cfg, 3, ACTION_DIM)}
    if ref is not None:
        torch.manual_seed(0)
        models["reference"] = reference_model(ref, cfg)
    return models


def _side_by_side(seconds: dict[str, float], unit: float, digits: int) -> dict:
    out = {k: round(v * unit, digits) for k, v in seconds.items()}
    if "reference" in seconds:
        out["ratio_ref_over_ours"] = _ratio(seconds["reference"], seconds["ours"])
    return out


def measure_train(ref, models: dict[str, nn.Module], cfg, batch: int, repeats: int) -> dict:
    """Median ms of one training step of each side on the same random normalised frames."""
    w = cfg.world
    t, r = w.history + w.num_preds, w.frame_size
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, t, 3, r, r, generator=gen)
    actions = torch.randn(batch, t, w.frameskip * ACTION_DIM, generator=gen)
    steps = {"ours": our_train_step(models["ours"], cfg)}
    if "reference" in models:
        steps["reference"] = reference_train_step(ref, models["reference"], cfg)
    for m in models.values():
        m.train()
    wall, cpu = _interleaved({k: (lambda s=s: s(frames, actions)) for k, s in steps.items()}, repeats)
    return {"batch_windows": batch, "frames_per_window": t, **_side_by_side(wall, 1e3, 1),
            "process_cpu": _side_by_side(cpu, 1e3, 1)}


def _encode_fn(side: str, model: nn.Module, frames: torch.Tensor, goal: torch.Tensor) -> Callable[[], None]:
    if side == "ours":
        return lambda: (model.encode(frames), model.encode(goal))
    return lambda: (model.encode({"pixels": frames}), model.encode({"pixels": goal}))


def measure_decision(ref, models: dict[str, nn.Module], cfg, iterations: int, repeats: int) -> dict:
    """Seconds of one CEM decision at LeWM's setting per side and context length, scaled from `iterations`."""
    r, full = cfg.world.frame_size, CEMConfig().iterations
    gen = torch.Generator().manual_seed(1)
    goal = torch.randn(1, 1, 3, r, r, generator=gen)
    contexts = {h: torch.randn(1, h, 3, r, r, generator=gen) for h in (1, cfg.world.history)}
    fns, encodes = {}, {}
    for side, model in models.items():
        model.eval().requires_grad_(False)
        for h, frames in contexts.items():
            if side == "reference" and h != 1:
                continue  # LeWM plans from history_len 1 (PlanConfig's default, its evaluation's setting)
            key = f"{side}_context{h}"
            fns[key] = (our_decision(model, cfg, frames, goal, iterations) if side == "ours"
                        else reference_decision(ref, model, cfg, frames, goal, iterations))
            encodes[key] = _encode_fn(side, model, frames, goal)
    with torch.inference_mode():
        enc, enc_cpu = _interleaved(encodes, repeats)
    timed, timed_cpu = _interleaved(fns, repeats)
    for model in models.values():
        model.requires_grad_(True)
    seconds = {k: enc[k] + (timed[k] - enc[k]) * full / iterations for k in fns}
    cpu = {k: enc_cpu[k] + (timed_cpu[k] - enc_cpu[k]) * full / iterations for k in fns}
    out = {"candidates": CEMConfig().candidates, "iterations": full, "elites": CEMConfig().elites,
           "horizon_blocks": CEMConfig().horizon, "iterations_timed": iterations,
           "scaled": f"decision = encode + {full}/{iterations} x (timed {iterations}-iteration solve - encode)"
           if iterations != full else "not scaled: full decisions timed",
           "encode_ms": {k: round(1e3 * v, 1) for k, v in enc.items()},
           "decision_s": {k: round(v, 3) for k, v in seconds.items()},
           "decision_process_cpu_s": {k: round(v, 3) for k, v in cpu.items()}}
    if "reference" in models:
        for key, secs in (("ratio_ref_over_ours", seconds), ("process_cpu_ratio_ref_over_ours", cpu)):
            out[key] = {f"ours_context{h}": _ratio(secs["reference_context1"], secs[f"ours_context{h}"]) for h in contexts}
    return out


def profile_train(steps: int = 2, warmup: int = 1, batch: int = 16, overrides: tuple[str, ...] = ()) -> dict:
    """Both train steps under torch.profiler (profile_world_step's accounting): the share of each op kind."""
    from benchmarks.profile_world_step import profile_steps

    ref, why = load_reference()
    cfg = load_config(PRESET, list(overrides))
    models = _models(ref, cfg)
    w = cfg.world
    t, r = w.history + w.num_preds, w.frame_size
    frames, actions = torch.randn(batch, t, 3, r, r), torch.randn(batch, t, w.frameskip * ACTION_DIM)
    steps_of = {"ours": our_train_step(models["ours"], cfg)}
    if ref is not None:
        steps_of["reference"] = reference_train_step(ref, models["reference"], cfg)
    out = {"threads": torch.get_num_threads(), "batch_windows": batch, "inputs": "normalised float frames (no data path)"}
    for side, step in steps_of.items():
        out[side] = profile_steps(lambda step=step: step(frames, actions), steps, warmup)
    if ref is None:
        out["reference"] = {"available": False, "reason": why}
    return out


def run(threads: list[int] | None = None, batch: int = 16, iterations: int = 3, repeats: int = 3,
        overrides: tuple[str, ...] = ()) -> dict:
    """The side by side at each thread count; ours only, saying why, without stable_worldmodel.
    overrides: `--set` items on the lewm preset (the tests shrink it; the figures use none)."""
    ref, why = load_reference()
    cfg = load_config(PRESET, list(overrides))
    models = _models(ref, cfg)
    load_before = [round(x, 2) for x in os.getloadavg()]
    cases = []
    for n in threads or [torch.get_num_threads()]:
        torch.set_num_threads(n)
        cases.append({"threads": n, "train_step_ms": measure_train(ref, models, cfg, batch, repeats),
                      "cem_decision": measure_decision(ref, models, cfg, iterations, repeats)})
    w = cfg.world
    reference = ({"package": f"stable-worldmodel {ref.version}", "files_loaded": list(REFERENCE_FILES),
                  "encoder": f"transformers {importlib.metadata.version('transformers')} ViTModel, attention "
                             f"'{models['reference'].encoder.config._attn_implementation}'"}
                 if ref is not None else {"available": False, "reason": why})
    if ref is not None and ref.version != REFERENCE_VERSION:
        reference["note"] = f"measured against {ref.version}; the issue's table was {REFERENCE_VERSION}"
    return {
        "benchmark": "world_reference", "machine": describe(torch.device("cpu")),
        "load_average_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "reference": reference,
        "sizes": {"preset": PRESET, "overrides": list(overrides), "encoder": f"{cfg.model.arch}/{cfg.model.patch_size} at {w.frame_size} px",
                  "latent": w.latent_dim, "predictor_depth": w.depth, "history": w.history, "frameskip": w.frameskip,
                  "action_dim": ACTION_DIM, "dtype": "float32"},
        "parameters_millions": {k: parameters(m) for k, m in models.items()},
        "repeats": repeats, "timing": "reference and ours interleaved, one warm-up each, medians",
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="CPU threads (repeatable: each case at each)")
    parser.add_argument("--batch", type=int, default=16, help="training windows per step (default 16)")
    parser.add_argument("--iterations", type=int, default=3, help="CEM iterations timed per decision, scaled to 30")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="instead: profile both train steps (op kinds' shares)")
    args = parser.parse_args()
    if args.profile:
        torch.set_num_threads((args.threads or [1])[0])
        doc = {"benchmark": "world_reference_profile", "machine": describe(torch.device("cpu")),
               "profile": profile_train(batch=args.batch)}
    else:
        doc = run(args.threads, args.batch, args.iterations, args.repeats)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
