"""Rollouts of many candidate action sequences from one shared context, computing nothing twice.

    preds = rollout_candidates(model, z, past, candidates)   # (B, C, K, D)

is what `WorldModel.rollout` gives for each candidate separately (to rounding), at a fraction of
the cost. A planner asks for C candidates (LeWM's CEM: 300) from the same context at every one of
its iterations; a plain rollout expands the context to every candidate and runs the whole
predictor on the whole window at each of the K steps. Here:

- context tokens whose latent and action block are both shared (every context position but the
  last, whose block is the candidate's first) are run once per step for the batch, not for each
  candidate; candidates attend to their keys and values (causal attention: a shared token never
  looks at a candidate's, so its hidden states are the same for every candidate);
- the action embedding and each block's AdaLN modulation are computed once per action block,
  not once per window that contains it (they depend on the block, not on its position);
- the last predictor block runs attention queries, output projection and MLP for the newest
  position only (the one a rollout reads); the others still give it keys and values.

What cannot be shared: the predictor's position embedding is added at the input, so a token that
slides one place left in the window has different hidden states at every layer; a full window is
recomputed each step, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lejepa_cli.world.model import ConditionedBlock, WorldModel, _modulate

Modulation = tuple[torch.Tensor, ...]  # shift1, scale1, gate1, shift2, scale2, gate2, each (..., T, dim)


def _split_heads(x: torch.Tensor, block: ConditionedBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, _ = x.shape
    q, k, v = x.view(b, t, 3, block.heads, block.head_dim).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, heads, T, head_dim)


def _finish(block: ConditionedBlock, x: torch.Tensor, attn: torch.Tensor, mods: Modulation) -> torch.Tensor:
    """The block after attention: residual with gate1, then the modulated MLP with gate2 (eval mode)."""
    _, _, gate1, shift2, scale2, gate2 = mods
    b, t = x.shape[:2]
    x = x + gate1 * block.proj(attn.transpose(1, 2).reshape(b, t, -1))
    return x + gate2 * block.mlp(_modulate(block.norm2(x), shift2, scale2))


def _slice(mods: Modulation, start: int, stop: int) -> Modulation:
    return tuple(m[:, start:stop] for m in mods)


def _window_step(model: WorldModel, shared: torch.Tensor | None, shared_mods: list[Modulation],
                 own: torch.Tensor, own_mods: list[Modulation], candidates: int) -> torch.Tensor:
    """One predictor pass over a window = [shared tokens (B, S, dim)] + [each candidate's tokens
    (B*C, T, dim)]; returns the prediction from the window's newest position, (B*C, dim)."""
    last = len(model.predictor.blocks) - 1
    mask = None
    if shared is not None:  # candidate token j (window position S + j) sees the shared tokens and its own up to j
        s, t = shared.shape[1], own.shape[1]
        mask = torch.ones(t, s + t, dtype=torch.bool, device=own.device).tril(diagonal=s)
    for i, block in enumerate(model.predictor.blocks):
        mods = own_mods[i]
        q, k, v = _split_heads(block.qkv(_modulate(block.norm1(own), mods[0], mods[1])), block)
        block_mask = mask
        if shared is not None:
            smods = shared_mods[i]
            sq, sk, sv = _split_heads(block.qkv(_modulate(block.norm1(shared), smods[0], smods[1])), block)
            if i < last:  # the shared tokens' own outputs feed the next block; the last block needs only their k, v
                shared = _finish(block, shared, F.scaled_dot_product_attention(sq, sk, sv, is_causal=True), smods)
            k = torch.cat([sk.repeat_interleave(candidates, dim=0), k], dim=2)  # (B*C, heads, S + T, head_dim)
            v = torch.cat([sv.repeat_interleave(candidates, dim=0), v], dim=2)
        if i == last:  # only the newest position is read out
            q, mods, own = q[:, :, -1:], _slice(mods, -1, None), own[:, -1:]
            block_mask = None if mask is None else mask[-1:]
        causal = block_mask is None and q.shape[2] > 1
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, is_causal=causal)
        own = _finish(block, own, attn, mods)
    return model.predictor.out(model.predictor.norm(own))[:, -1]


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
    pred = model.predictor
    b, h, d = z.shape
    c, k_steps = candidates.shape[1:3]
    history = model.history
    # action embeddings and every block's modulation, once per block of actions
    shared_mods_all = [blk.ada(model.action_encoder(past)).chunk(6, dim=-1) for blk in pred.blocks] if h > 1 else None
    own_c = model.action_encoder(candidates.flatten(0, 1))  # (B*C, K, dim)
    own_mods_all = [blk.ada(own_c).chunk(6, dim=-1) for blk in pred.blocks]
    latents = z.repeat_interleave(c, dim=0)[:, -1:]  # the candidates' own tokens so far: the last context latent
    preds = []
    for step in range(k_steps):
        end = h + step  # the window is sequence elements [start, end); elements < h - 1 are shared
        start = max(0, end - history)
        n_shared = max(0, h - 1 - start)
        shared, shared_mods = None, []
        if n_shared:
            shared = z[:, start : h - 1] + pred.pos_embed[:, :n_shared]
            shared_mods = [_slice(m, start, h - 1) for m in shared_mods_all]
        own_latents = latents[:, -(end - start - n_shared):]  # (B*C, T, D)
        t = own_latents.shape[1]
        own = own_latents + pred.pos_embed[:, n_shared : n_shared + t]
        own_mods = [_slice(m, step + 1 - t, step + 1) for m in own_mods_all]
        nxt = _window_step(model, shared, shared_mods, own, own_mods, c)  # (B*C, D)
        preds.append(nxt)
        latents = torch.cat([latents, nxt[:, None]], dim=1)
    return torch.stack(preds, dim=1).view(b, c, k_steps, d)
