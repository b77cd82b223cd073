"""Physical probes: how much of the true state a world model's latents hold, in a form a line can read.

    from lejepa_cli.world.probe import probe_world
    report = probe_world(model, world, episodes=20)
    report["r2"]["agent_x"]            # held-out R^2 of a linear probe on one frame's latent
    report["r2_random_init"]["agent_x"]  # the same probe on a randomly initialised encoder

Probes are fitted on freshly simulated training episodes and scored on other, held-out ones
(seed streams no training dataset uses). A run evaluated on stored trajectories (world/episodes.py:
trained on a stable-worldmodel file, or `--data FILE`) is probed on the file's stored state
columns (`state`, `proprio`, named as the file names them), scored on the episodes the run held
out (or, without any, a seeded third of the episodes) and fitted on the others. Features: one window frame's latent z_t, or the
history the predictor reads (the H latents z_{t-H+1} .. z_t, concatenated), both on the same
frames (those with a full history). Probes (lejepa_cli.probes): ridge regression in closed form
(penalty chosen by cross-validation over whole training episodes), and a small MLP (one hidden
layer, full-batch Adam, early-stopped on held-out training episodes). Hidden parameters (mass, friction:
constant in an episode, invisible in one frame) are "recoverable" from a feature set when a probe reaches R^2 >= 0.5.
An angle (Push-T's block, a pendulum's theta) is also probed as its cosine and sine (`<name>_cos`, `<name>_sin`).
"""

from __future__ import annotations

import numpy as np
import torch

from lejepa_cli.errors import UserError
from lejepa_cli.probes import mlp_probe, r2_score, ridge_cv
from lejepa_cli.world.episodes import as_source
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.world.gym_state import is_angle
from lejepa_cli.world.runs import encode_episodes, require_window_frames, window_frames

RECOVERABLE = 0.5  # R^2 from which a hidden parameter counts as readable


def random_init_like(model: WorldModelExport, seed: int = 0) -> WorldModelExport:
    """A world model of the same architecture and input normalisation, with freshly initialised weights."""
    from lejepa_cli.models import build_backbone
    from lejepa_cli.world.model import WorldModel

    spec, info = model.spec, model.model.backbone.lejepa_info
    torch.manual_seed(seed)
    backbone = build_backbone(**info["arch_config"])
    backbone.lejepa_info = info
    return WorldModelExport(WorldModel.from_spec(spec, backbone), spec, model.mean, model.std)


def require_full_history(model: WorldModelExport, steps: int, history: int | None = None) -> None:
    """Episodes of `steps` steps must hold at least one full history (the model's, or `history`) of window frames."""
    h = history or model.history
    require_window_frames(model, steps, h, f"fewer than the history {h}")


def require_state(source) -> None:
    """A one-line UserError when an episode source stores no true state to probe."""
    if not source.has_state:
        raise UserError(f"{source.name} stores no true state (no 'state' or 'proprio' column): the probes have "
                        f"nothing to read; `lejepa world surprise | stress` still run on it")


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


def with_angle_components(states: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Append the cosine and sine of every angle column as `<name>_cos`, `<name>_sin`. A wrapped angle
    jumps by 2 pi where the orientation barely turns, so no line reads it from any latent (Push-T's block
    angle: R^2 -0.1, a random encoder's); its cosine and sine are smooth in the orientation."""
    angles = [i for i, n in enumerate(names) if is_angle(n)]
    if not angles:
        return states, names
    extra = np.concatenate([np.cos(states[..., angles]), np.sin(states[..., angles])], axis=-1)
    return (np.concatenate([states, extra], axis=-1),
            [*names, *(f"{names[i]}_cos" for i in angles), *(f"{names[i]}_sin" for i in angles)])


def probe_world(model: WorldModelExport, world, *, episodes: int = 20, train_episodes: int | None = None,
                steps: int | None = None, seed: int = 0, history: int | None = None) -> dict:
    """Probe every state variable of `world` from the model's latents and from a random-init encoder's.

    `world`: a World (or SimulatedEpisodes), or StoredEpisodes (world/episodes.py) whose stored state is probed.
    Keys: r2 and r2_random_init (variable -> linear single-frame R^2), r2_mlp, r2_history,
    r2_history_mlp and their _random_init twins, hidden (hidden parameter -> its best R^2 from one
    frame and from the history and where it is recoverable from), episodes, train_episodes,
    history (window frames in the history features: the predictor's H unless `history` is given).
    """
    source = as_source(world)
    train_episodes = train_episodes or 2 * episodes
    if episodes < 1 or train_episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}")
    history = history or model.history
    if history < 1:
        raise UserError(f"--history must be >= 1 window frame, got {history}")
    steps = source.resolve_steps(steps)
    require_full_history(model, steps, history)
    require_state(source)
    fit, test = source.episodes("fit", train_episodes, steps, seed), source.episodes("test", episodes, steps, seed)
    names = source.state_names or [f"state_{i}" for i in range(fit.states.shape[-1])]
    fit_states, _ = with_angle_components(fit.states, names)
    test_states, names = with_angle_components(test.states, names)
    report: dict = {"episodes": len(test), "train_episodes": len(fit), "steps": steps, "history": history,
                    "state_names": names}
    report.update({"world": source.name} if source.kind == "simulator" else {"data": source.name, "split": source.split})
    for tag, m in (("", model), ("_random_init", random_init_like(model, seed))):
        scores = fit_probes(features(m, fit.frames, fit_states, history), features(m, test.frames, test_states, history), seed)
        for key, r2 in (("r2", "linear_frame"), ("r2_mlp", "mlp_frame"), ("r2_history", "linear_history"),
                        ("r2_history_mlp", "mlp_history")):
            report[f"{key}{tag}"] = {n: float(v) for n, v in zip(names, scores[r2])}
    report["hidden"] = hidden_parameters(report, names)
    return report


def hidden_parameters(report: dict, names: list[str]) -> dict:
    """Hidden parameter -> its best R^2 from one frame and from the history, and where it is recoverable from."""
    hidden = {}
    for name in filter(is_hidden, names):
        frame = max(report["r2"][name], report["r2_mlp"][name])
        history = max(report["r2_history"][name], report["r2_history_mlp"][name])
        where = "history" if history >= RECOVERABLE else "not recoverable"
        hidden[name] = {"frame": frame, "history": history, "recoverable_from": "one frame" if frame >= RECOVERABLE else where}
    return hidden
