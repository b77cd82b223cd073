"""Vision Transformer backbones (ViT-T/S/B/L/H) with timm-identical parameter names.

Pre-norm blocks, a CLS token, learned absolute position embeddings, attention through
`F.scaled_dot_product_attention`, stochastic depth growing linearly with depth, no head.
Every parameter is named as in timm's `VisionTransformer` (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`),
so a state dict loads into `timm.create_model("vit_small_patch16_224", num_classes=0,
dynamic_img_size=True)` unchanged and gives the same outputs at any resolution.

Inputs of any side that is a multiple of the patch are accepted (global 224 + local 96 views,
or 32 + 16 at patch 4): the patch-grid part of `pos_embed` is resampled bicubically (with
antialiasing, as timm's `resample_abs_pos_embed`) to the input's grid on every forward, so
gradients from every view reach the one `pos_embed` parameter.

    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    h = vit(images)                   # (N, 192) CLS token after the final norm
    f = vit.probe_features(images)    # (N, 384) normed CLS of the last two blocks
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_nano": (64, 4, 2),  # not a timm size: world models of small rendered worlds on a CPU
    "vit_micro": (128, 6, 4),  # not a timm size: for CPU demos and tests
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescale the kept ones."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # One Bernoulli draw per sample, broadcast over tokens and channels.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, h, w)
        return x.permute(0, 2, 3, 1)  # (N, h, w, D): the grid shape is still needed for pos_embed


class Attention(nn.Module):
    """Multi-head self-attention; qkv packed as timm packs it ([q | k | v], heads contiguous)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, d/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d/H)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder without a head. `forward` gives the normed CLS token (N, embed_dim).

    `probe_features` concatenates the CLS tokens of the last two blocks, BOTH passed through
    the final `norm` (as DINOv2's linear evaluation does with `get_intermediate_layers(norm=True)`):
    the second-to-last block's raw output has a much larger, drifting scale, and sharing the
    final norm keeps the two halves comparable without adding parameters.
    """

    num_prefix_tokens = 1  # the CLS token; timm's name for it

    def __init__(
        self,
        *,
        arch: str = "vit_custom",
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.arch = arch
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.feature_dim = 2 * embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.drop_path = drop_path
        self.grid_size = img_size // patch_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, embed_dim))
        # 0 at the first block, drop_path at the last; plain floats so building on the meta device works.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's default ("vit_timm") scheme; the patch conv keeps PyTorch's default init.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # --- public API -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> embedding h (N, embed_dim): the CLS token after the final norm."""
        (last,) = self._block_outputs(x, n_last=1)
        return self.norm(last[:, 0])  # LayerNorm is per token, so normalising only CLS is exact

    def probe_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (N, 2 * embed_dim): [norm(CLS of block -2), norm(CLS of block -1)]."""
        prev, last = self._block_outputs(x, n_last=2)
        return torch.cat([self.norm(prev[:, 0]), self.norm(last[:, 0])], dim=-1)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final-normed patch tokens (N, L, embed_dim), row-major over the patch grid."""
        (last,) = self._block_outputs(x, n_last=1)
        return self.norm(last[:, self.num_prefix_tokens :])

    def arch_config(self) -> dict:
        """JSON-serialisable kwargs that rebuild this backbone with `build_backbone(**cfg)`."""
        return {
            "arch": self.arch,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "drop_path": self.drop_path,
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names (besides biases and norms) that the optimizer should not decay."""
        return {"pos_embed", "cls_token"}

    # --- internals --------------------------------------------------------------------------

    def _pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """pos_embed (1, 1 + h*w, D) for an h x w patch grid; resampled when it is not the native one."""
        if h == w == self.grid_size:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g, d = self.grid_size, self.embed_dim
        grid_pos = grid_pos.float().reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        # Same call as timm's resample_abs_pos_embed, so exported weights behave identically there.
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, d).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> [CLS, patches] + position embeddings (N, 1 + L, D)."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of patch_size {self.patch_size}")
        x = self.patch_embed(x)  # (N, h, w, D)
        n, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(n, -1, -1).to(x.dtype), x.reshape(n, h * w, d)], dim=1)
        return x + self._pos_embed_for(h, w).to(x.dtype)  # (N, 1 + L, D)

    def _block_outputs(self, x: torch.Tensor, n_last: int) -> list[torch.Tensor]:
        """Raw (un-normed) token outputs (N, 1 + L, D) of the last `n_last` blocks."""
        x = self._tokens(x)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        outs = []
        for i, blk in enumerate(self.blocks):
            # Non-reentrant checkpointing restores the RNG state, so drop-path masks are replayed.
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
            if i >= self.depth - n_last:
                outs.append(x)
        return outs
