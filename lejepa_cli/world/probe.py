"""Physical probes: how much of the true state a world model's latents hold, in a form a line can read.

    from lejepa_cli.world.probe import probe_world
    report = probe_world(model, world, episodes=20)
    report["r2"]["agent_x"]            # held-out R^2 of a linear probe on one frame's latent
    report["r2_random_init"]["agent_x"]  # the same probe on a randomly initialised encoder

Probes are fitted on freshly simulated training episodes and scored on other, held-out ones
(seed streams no training dataset uses). Features: one window frame's latent z_t, or the
history the predictor reads (the H latents z_{t-H+1} .. z_t, concatenated), both on the same
frames (those with a full history). Probes (lejepa_cli.probes): ridge regression in closed form
(penalty chosen by cross-validation over whole training episodes), and a small MLP (one hidden
layer, full-batch Adam, early-stopped on held-out training episodes). Hidden parameters (mass, friction:
constant in an episode, invisible in one frame) are "recoverable" from a feature set when a probe reaches R^2 >= 0.5.
"""

from __future__ import annotations

import numpy as np
import torch

from lejepa_cli.errors import UserError
from lejepa_cli.probes import mlp_probe, r2_score, ridge_cv
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.world.sim import World, simulate
from lejepa_cli.world.runs import encode_episodes, require_window_frames, window_frames

RECOVERABLE = 0.5  # R^2 from which a hidden parameter counts as readable
TRAIN_STREAM, TEST_STREAM = 101, 102  # seed streams apart from `lejepa world simulate`'s 0 (train) and 1 (val)


def random_init_like(model: WorldModelExport, seed: int = 0) -> WorldModelExport:
    """A world model of the same architecture and input normalisation, with freshly initialised weights."""
    from lejepa_cli.models import build_backbone
    from lejepa_cli.world.model import WorldModel

    spec, info = model.spec, model.model.backbone.lejepa_info
    torch.manual_seed(seed)
    backbone = build_backbone(**info["arch_config"])
    backbone.lejepa_info = info
    return WorldModelExport(WorldModel.from_spec(spec, backbone), spec, model.mean, model.std)


def simulated_split(world: World, episodes: int, steps: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, T, R, R, 3) and states (N, T, S) of `episodes` exploration episodes."""
    frames, states = [], []
    for chunk in simulate(world, episodes, steps, seed, stream):
        frames.append(chunk.frames.reshape(chunk.episodes, steps, *chunk.frames.shape[1:]))
        states.append(chunk.state.reshape(chunk.episodes, steps, -1))
    return np.concatenate(frames), np.concatenate(states).astype(np.float64)


def require_full_history(model: WorldModelExport, steps: int, history: int | None = None) -> None:
    """Episodes of `steps` steps must hold at least one full history (the model's, or `history`) of window frames."""
    h = history or model.history
    require_window_frames(model, steps, h, f"fewer than the history {h}")


def features(model: WorldModelExport, frames: np.ndarray, states: np.ndarray, history: int | None = None) -> dict[str, np.ndarray]:
    """Window-frame features with a full history: 'frame' (M, D), 'history' (M, H * D), 'state' (M, S), 'episode' (M,)."""
    fs, h = model.frameskip, history or model.history
    z = encode_episodes(model, window_frames(frames, fs)).numpy()  # (N, L, D)
    s = window_frames(states, fs)  # (N, L, S)
    n, length, d = z.shape
    require_full_history(model, frames.shape[1], h)
    hist = np.concatenate([z[:, k : length - h + 1 + k] for k in range(h)], axis=-1)  # (N, L-H+1, H*D)
    episode = np.repeat(np.arange(n), length - h + 1)  # (M,) which episode each row comes from
    return {"frame": z[:, h - 1 :].reshape(-1, d), "history": hist.reshape(-1, h * d),
            "state": s[:, h - 1 :].reshape(-1, s.shape[-1]), "episode": episode}


def fit_probes(train: dict[str, np.ndarray], test: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """R^2 per state column for {linear, mlp} x {frame, history}: keys like 'linear_frame'."""
    out = {}
    for feat in ("frame", "history"):
        out[f"linear_{feat}"] = r2_score(test["state"], ridge_cv(train[feat], train["state"], test[feat], train["episode"]))
        out[f"mlp_{feat}"] = r2_score(test["state"], mlp_probe(train[feat], train["state"], test[feat], train["episode"], seed=seed))
    return out


def is_hidden(name: str) -> bool:
    return name.endswith(("mass", "friction"))


def probe_world(model: WorldModelExport, world: World, *, episodes: int = 20, train_episodes: int | None = None,
                steps: int = 60, seed: int = 0, history: int | None = None) -> dict:
    """Probe every state variable of `world` from the model's latents and from a random-init encoder's.

    Keys: r2 and r2_random_init (variable -> linear single-frame R^2), r2_mlp, r2_history,
    r2_history_mlp and their _random_init twins, hidden (hidden parameter -> its best R^2 from one
    frame and from the history and where it is recoverable from), episodes, train_episodes,
    history (window frames in the history features: the predictor's H unless `history` is given).
    """
    train_episodes = train_episodes or 2 * episodes
    if episodes < 1 or train_episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}")
    names = world.state_names
    train_f, train_s = simulated_split(world, train_episodes, steps, seed, TRAIN_STREAM)
    test_f, test_s = simulated_split(world, episodes, steps, seed, TEST_STREAM)
    history = history or model.history
    if history < 1:
        raise UserError(f"--history must be >= 1 window frame, got {history}")
    report: dict = {"episodes": episodes, "train_episodes": train_episodes, "steps": steps, "world": world.name,
                    "history": history}
    for tag, m in (("", model), ("_random_init", random_init_like(model, seed))):
        scores = fit_probes(features(m, train_f, train_s, history), features(m, test_f, test_s, history), seed)
        for key, r2 in (("r2", "linear_frame"), ("r2_mlp", "mlp_frame"), ("r2_history", "linear_history"),
                        ("r2_history_mlp", "mlp_history")):
            report[f"{key}{tag}"] = {n: float(v) for n, v in zip(names, scores[r2])}
    hidden = {}
    for name in filter(is_hidden, names):
        frame = max(report["r2"][name], report["r2_mlp"][name])
        history = max(report["r2_history"][name], report["r2_history_mlp"][name])
        where = "history" if history >= RECOVERABLE else "not recoverable"
        hidden[name] = {"frame": frame, "history": history, "recoverable_from": "one frame" if frame >= RECOVERABLE else where}
    report["hidden"] = hidden
    return report
