"""The probe kit both sides share: standardising, ridge and MLP regression probes, R^2, splits, ranks.

    from lejepa_cli import probes
    xs, xt = probes.standardise(x_train, x_test)                 # train statistics on both
    pred = probes.ridge_cv(x_train, y_train, x_test, episode)    # penalty by grouped cross-validation
    probes.r2_score(y_test, pred)                                # (S,) held-out R^2 per column
    fit, val = probes.split_train_val(len(x), 0.1, seed=0)       # seeded index split

The world probes (world/probe.py) regress states on latents; the image probes (image/classifiers.py)
carve their validation part and centre few-shot features with the same pieces, and label-free
checkpoint ranking (Spearman) and surprise (AUROC) share `average_ranks`. numpy and torch only.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge penalties tried (times N, on standardised features)

Array = TypeVar("Array", np.ndarray, torch.Tensor)


# ---- preprocessing and splits -------------------------------------------------------------------


def centre(train: Array, *others: Array) -> list[Array]:
    """[train, *others] minus the train mean over rows (numpy arrays or tensors)."""
    mu = train.mean(0)
    return [x - mu for x in (train, *others)]


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """[train, *others] centred and divided by the train std over rows (+ 1e-6, so a constant column stays finite)."""
    sd = train.std(0) + 1e-6
    return [x / sd for x in centre(train, *others)]


def split_train_val(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a seeded random split of n items; val gets `fraction` of them (at least 1), both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def grouped_folds(groups: np.ndarray, k: int = 4) -> list[np.ndarray]:
    """Boolean validation masks (N,) that split whole groups, e.g. episodes (a probe must not learn one by heart);
    none when there is a single group."""
    ids = np.unique(groups)
    return [np.isin(groups, ids[i::k]) for i in range(min(k, len(ids))) if len(ids) > 1]


# ---- scores --------------------------------------------------------------------------------------


def r2_score(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-column R^2 = 1 - SSE / SST of predictions (N, S); a constant column scores 0 when predicted exactly, else < 0."""
    sse = ((y - pred) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0)
    return np.where(sst > 1e-12, 1.0 - sse / np.maximum(sst, 1e-12), np.where(sse < 1e-12, 0.0, -np.inf))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array (float64), ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # each run of equal values
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2.0
    return ranks


# ---- regression probes ---------------------------------------------------------------------------


def ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """Closed-form ridge regression (features standardised, intercept unpenalised); predictions (N_test, S)."""
    xs, xt = standardise(x_train.astype(np.float64), x_test.astype(np.float64))
    y_mean = y_train.mean(0)
    gram = xs.T @ xs + lam * len(xs) * np.eye(xs.shape[1])
    w = np.linalg.solve(gram, xs.T @ (y_train - y_mean))  # (F, S)
    return xt @ w + y_mean


def ridge_cv(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Ridge with the penalty chosen per target column by group-wise cross-validation on the training set."""
    folds = grouped_folds(groups)
    if not folds:
        return ridge_probe(x_train, y_train, x_test)
    errors = []
    for lam in RIDGE_LAMBDAS:
        err = sum(((ridge_probe(x_train[~v], y_train[~v], x_train[v], lam) - y_train[v]) ** 2).sum(0) for v in folds)
        errors.append(err)  # (S,)
    best = np.asarray(RIDGE_LAMBDAS)[np.argmin(np.stack(errors), axis=0)]  # (S,)
    out = np.empty((len(x_test), y_train.shape[1]))
    for lam in np.unique(best):
        cols = best == lam
        out[:, cols] = ridge_probe(x_train, y_train[:, cols], x_test, float(lam))
    return out


def mlp_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, groups: np.ndarray | None = None, *,
              hidden: int = 128, steps: int = 400, seed: int = 0) -> np.ndarray:
    """A one-hidden-layer MLP (full-batch Adam on standardised inputs and targets); predictions (N_test, S).

    With `groups`, a quarter of the training groups is held out and the weights with the lowest
    error on them are kept (early stopping, so the MLP does not learn groups by heart).
    """
    val = grouped_folds(groups)[0] if groups is not None and grouped_folds(groups) else np.zeros(len(x_train), bool)
    xs, xt = (torch.from_numpy(a).float() for a in standardise(x_train, x_test))
    (ys,) = standardise(y_train)
    y_mu, y_sd = y_train.mean(0), y_train.std(0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(xs.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, ys.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    target = torch.from_numpy(ys).float()
    fit, held = torch.from_numpy(~val), torch.from_numpy(val)
    best, best_state = float("inf"), None
    for step in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(xs[fit]), target[fit]).backward()
        opt.step()
        if val.any() and step % 10 == 9:
            with torch.no_grad():
                loss = float(torch.nn.functional.mse_loss(net(xs[held]), target[held]))
            if loss < best:
                best, best_state = loss, {k: v.clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    with torch.no_grad():
        return net(xt).numpy().astype(np.float64) * y_sd + y_mu
