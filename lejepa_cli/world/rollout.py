"""Rollouts of many candidate action sequences from one shared context, computing nothing twice.

    preds = rollout_candidates(model, z, past, candidates)   # (B, C, K, D)

is what `WorldModel.rollout` gives for each candidate separately (to rounding), at a fraction of
the cost. A planner asks for C candidates (LeWM's CEM: 300) from the same context at every one of
its iterations; a plain rollout expands the context to every candidate and runs the whole
predictor on the whole window at each of the K steps. Here:

- context tokens whose latent and action block are both shared (every context position but the
  last, whose block is the candidate's first) are run once for the batch, not for each
  candidate; candidates attend to their keys and values (causal attention: a shared token never
  looks at a candidate's, so its hidden states are the same for every candidate);
- while the window still grows (fewer context latents than the predictor's history), a token
  keeps its position from one step to the next, so its keys and values are kept (a KV cache)
  and each step runs only the newest token; LeWM's evaluation plans from one context frame,
  so 3 of its 5 steps are of this kind;
- the action embedding and each block's AdaLN modulation are computed once per action block,
  not once per window that contains it (they depend on the block, not on its position);
- the last predictor block runs attention queries, output projection and MLP for the newest
  position only (the one a rollout reads); the others still give it keys and values;
- attention over a single key is that key's value (softmax of one score is 1), no kernel call.

What cannot be shared: the predictor's position embedding is added at the input, so once the
window slides, a token that moves one place left has different hidden states at every layer; a
full window is recomputed at each such step, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lejepa_cli.world.model import ConditionedBlock, WorldModel

# Tensors here are time-major, (T, N, dim): a window's slice of the per-block modulations is then
# one contiguous block, and elementwise ops on contiguous operands run several times faster on a
# CPU than on the strided slices of batch-major ones (measured: addcmul 7x at two-room's sizes).

# Per predictor block, from its AdaLN: shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2, each
# (T, N, dim) and contiguous. The scales carry their 1 + so that modulating is one fused multiply-add.
Modulation = tuple[torch.Tensor, ...]
KeysValues = tuple[torch.Tensor, torch.Tensor]  # (N, heads, L, head_dim) each


def _modulations(model: WorldModel, actions: torch.Tensor) -> list[Modulation]:
    """Every predictor block's modulation of action blocks (N, T, A), time-major, the action
    embedding computed once."""
    dim = model.predictor.pos_embed.shape[-1]
    cond = F.silu(model.action_encoder(actions)).transpose(0, 1).contiguous()  # (T, N, dim); each `ada` is SiLU, Linear
    mods = []
    for block in model.predictor.blocks:
        w, b = block.ada[1].weight, block.ada[1].bias
        parts = [F.linear(cond, w[j * dim : (j + 1) * dim], b[j * dim : (j + 1) * dim]) for j in range(6)]
        parts[1].add_(1)  # 1 + scale1
        parts[4].add_(1)  # 1 + scale2
        mods.append(tuple(parts))
    return mods


def _slice(mods: list[Modulation], start: int, stop: int | None) -> list[Modulation]:
    return [tuple(m[start:stop] for m in block_mods) for block_mods in mods]


def _qkv(block: ConditionedBlock, x: torch.Tensor, mods: Modulation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (N, heads, T, head_dim) of tokens x (T, N, dim) (eval mode)."""
    t, n, _ = x.shape
    qkv = block.qkv(torch.addcmul(mods[0], block.norm1(x), mods[1])).view(t, n, 3, block.heads, block.head_dim)
    return tuple(qkv[:, :, j].permute(1, 2, 0, 3) for j in range(3))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of queries (N, heads, T, hd) over keys (N, heads, L, hd): causal within the last T keys
    unless a mask says otherwise."""
    if k.shape[2] == 1:  # one key (so one query): its softmax weight is exactly 1
        return v
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _finish(block: ConditionedBlock, x: torch.Tensor, attn: torch.Tensor, mods: Modulation) -> torch.Tensor:
    """The block after attention (N, heads, T, hd): residual with gate1, then the modulated MLP with
    gate2 (eval mode); x (T, N, dim)."""
    t, n, _ = x.shape
    x = torch.addcmul(x, mods[2], block.proj(attn.permute(2, 0, 1, 3).reshape(t, n, -1)))
    return torch.addcmul(x, mods[5], block.mlp(torch.addcmul(mods[3], block.norm2(x), mods[4])))


def _readout(model: WorldModel, x: torch.Tensor) -> torch.Tensor:
    return model.predictor.out(model.predictor.norm(x[-1]))  # (N, D)


def _shared_keys_values(model: WorldModel, shared: torch.Tensor, mods: list[Modulation]) -> list[KeysValues]:
    """Keys and values of the shared context tokens (S, B, dim) at every block (causal among themselves)."""
    kv, last = [], len(model.predictor.blocks) - 1
    for i, block in enumerate(model.predictor.blocks):
        q, k, v = _qkv(block, shared, mods[i])
        kv.append((k, v))
        if i < last:  # the last block needs only their keys and values
            shared = _finish(block, shared, _attend(q, k, v), mods[i])
    return kv


def _grow_step(model: WorldModel, x: torch.Tensor, mods: list[Modulation], cache: list[KeysValues | None]) -> torch.Tensor:
    """Run one new token x (1, N, dim) that sees every cached key (earlier positions of its window);
    its keys and values join the cache. Returns its prediction (N, D)."""
    for i, block in enumerate(model.predictor.blocks):
        q, k, v = _qkv(block, x, mods[i])
        if cache[i] is not None:
            k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
        cache[i] = (k, v)
        x = _finish(block, x, _attend(q, k, v), mods[i])
    return _readout(model, x)


def _window_step(model: WorldModel, shared: torch.Tensor | None, shared_mods: list[Modulation],
                 own: torch.Tensor, own_mods: list[Modulation], candidates: int) -> torch.Tensor:
    """One predictor pass over a window = [shared tokens (S, B, dim)] + [each candidate's tokens
    (T, B*C, dim)]; returns the prediction from the window's newest position, (B*C, D)."""
    last = len(model.predictor.blocks) - 1
    mask = None
    if shared is not None:  # candidate token j (window position S + j) sees the shared tokens and its own up to j
        s, t = shared.shape[0], own.shape[0]
        mask = torch.ones(t, s + t, dtype=torch.bool, device=own.device).tril(diagonal=s)
    for i, block in enumerate(model.predictor.blocks):
        mods = own_mods[i]
        q, k, v = _qkv(block, own, mods)
        block_mask = mask
        if shared is not None:
            sq, sk, sv = _qkv(block, shared, shared_mods[i])
            if i < last:  # the shared tokens' own outputs feed the next block; the last block needs only their k, v
                shared = _finish(block, shared, _attend(sq, sk, sv), shared_mods[i])
            k = torch.cat([sk.repeat_interleave(candidates, dim=0), k], dim=2)  # (B*C, heads, S + T, head_dim)
            v = torch.cat([sv.repeat_interleave(candidates, dim=0), v], dim=2)
        if i == last:  # only the newest position is read out
            q, mods, own = q[:, :, -1:], tuple(m[-1:] for m in mods), own[-1:]
            block_mask = None if mask is None else mask[-1:]
        own = _finish(block, own, _attend(q, k, v, block_mask), mods)
    return _readout(model, own)


@torch.no_grad()
def rollout_candidates(model: WorldModel, z: torch.Tensor, past: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Open-loop rollouts of C candidate action sequences from one context per batch row.

    z (B, H, D): the context latents (H <= history); past (B, H - 1, A): the action blocks between
    them; candidates (B, C, K, A): each candidate's K blocks, the first executed from the last
    context latent. Returns the K predicted latents of every candidate (B, C, K, D), the first
    being z_{H+1}: `model.rollout` of the expanded context, to rounding. The model must be in eval mode.
    """
    if model.training:
        raise ValueError("rollout_candidates runs the predictor in eval mode (no dropout): call model.eval()")
    pos = model.predictor.pos_embed[0, :, None]  # (history, 1, dim): time-major
    b, h, d = z.shape
    c, k_steps = candidates.shape[1:3]
    history = model.history
    own_mods_all = _modulations(model, candidates.flatten(0, 1))  # (K, B*C, dim) per block and kind, once per action block
    latents = [z[:, -1].repeat_interleave(c, dim=0)]  # the candidates' own tokens so far (B*C, D): the last context latent
    cache: list[KeysValues | None] = [None] * len(model.predictor.blocks)
    shared_mods_all: list[Modulation] = []
    if h > 1:  # the growing window starts from the shared context's keys and values
        shared_mods_all = _modulations(model, past)
        shared_kv = _shared_keys_values(model, z[:, : h - 1].transpose(0, 1) + pos[: h - 1], shared_mods_all)
        cache = [(k.repeat_interleave(c, dim=0), v.repeat_interleave(c, dim=0)) for k, v in shared_kv]
    for step in range(k_steps):
        end = h + step  # the window is sequence elements [start, end); elements < h - 1 are shared
        start = max(0, end - history)
        if start == 0:  # the window grows: its tokens keep their positions, only the newest is new
            nxt = _grow_step(model, (latents[-1] + pos[end - 1])[None], _slice(own_mods_all, step, step + 1), cache)
        else:
            n_shared = max(0, h - 1 - start)
            shared, shared_mods = None, []
            if n_shared:
                shared = z[:, start : h - 1].transpose(0, 1) + pos[:n_shared]
                shared_mods = _slice(shared_mods_all, start, h - 1)
            t = end - start - n_shared
            own = torch.stack(latents[-t:]) + pos[n_shared : n_shared + t]  # (T, B*C, D)
            nxt = _window_step(model, shared, shared_mods, own, _slice(own_mods_all, step + 1 - t, step + 1), c)
        latents.append(nxt)
    return torch.stack(latents[1:], dim=1).view(b, c, k_steps, d)
