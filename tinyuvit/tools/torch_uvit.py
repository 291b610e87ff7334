"""The same U-ViT in PyTorch, for `tinyuvit bench --compare torch` and the equivalence test.

Imported only when comparing: tinyuvit itself never needs PyTorch. The module tree and the
parameter names follow tinyuvit.model.UViT, so that `copy_weights` maps every tinyuvit
parameter to one PyTorch parameter (W -> weight, transposed for a Linear; g, b -> weight, bias):

    patch_embed.proj     Linear(p*p*C -> D) on flattened patches (channels fastest, as patchify)
    label_embed          Embedding(num_classes + 1, D), the last row the null label
    time token           sinusoid [cos(t f), sin(t f)], no parameters
    pos_embed.pos        [1, 2 + N, D]
    in_blocks, mid_block, out_blocks (skip_linear: Linear(2D -> D) on concat(x, skip))
      norm1, attn.qkv (no bias), attn.proj, norm2, mlp.fc1, GELU (exact), mlp.fc2
    norm, decoder_pred, unpatchify, final_layer (Conv2d 3x3, padding 1)
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def patchify(x, p):  # [B, C, H, W] -> [B, N, p*p*C]
    B, C, H, W = x.shape
    h, w = H // p, W // p
    return x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(x, p, C):  # [B, N, p*p*C] -> [B, C, H, W]
    B, N, _ = x.shape
    h = w = int(round(math.sqrt(N)))
    return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)


def timestep_embedding(t, dim, dtype):
    """[B] -> [B, dim]: [cos(t f), sin(t f)], f_i = exp(-ln(10000) i / half), computed in float64."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(dtype)


class PatchEmbed(nn.Module):
    def __init__(self, p, C, D):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(p * p * C, D)

    def forward(self, x):
        return self.proj(patchify(x, self.p))


class PosEmbed(nn.Module):
    def __init__(self, length, D):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, length, D))

    def forward(self, x):
        return x + self.pos


class Attention(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H = H
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D)

    def forward(self, x):  # [B, L, D]
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)  # [3, B, H, L, hd]
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                     # [B, H, L, hd]
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, D, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, hidden), nn.Linear(hidden, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, PyTorch's default


class Block(nn.Module):
    def __init__(self, D, H, mlp_ratio, skip=None):
        super().__init__()
        self.skip = skip
        if skip == "concat":
            self.skip_linear = nn.Linear(2 * D, D)
        self.norm1, self.attn = nn.LayerNorm(D, eps=1e-5), Attention(D, H)
        self.norm2, self.mlp = nn.LayerNorm(D, eps=1e-5), MLP(D, D * mlp_ratio)

    def forward(self, x, skip=None):
        if self.skip == "concat":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        elif self.skip == "add":
            x = x + skip
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchUViT(nn.Module):
    """tinyuvit.model.UViT's architecture (same config object) in PyTorch."""

    extras = 2

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.dim, cfg.patch_size, cfg.in_chans
        self.patch_embed = PatchEmbed(p, C, D)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, D)
        self.pos_embed = PosEmbed(self.extras + cfg.num_patches, D) if cfg.pos_embed == "learned" else None
        out_skip = None if cfg.skip == "none" else cfg.skip
        self.in_blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth // 2))
        self.mid_block = Block(D, cfg.num_heads, cfg.mlp_ratio)
        self.out_blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, out_skip)
                                        for _ in range(cfg.depth // 2))
        self.norm = nn.LayerNorm(D, eps=1e-5)
        self.decoder_pred = nn.Linear(D, p * p * C)
        self.final_layer = nn.Conv2d(C, C, 3, padding=1) if cfg.conv == "after" else None

    def forward(self, x, t, y):  # [B, C, H, W], [B], [B] -> [B, C, H, W]
        cfg = self.cfg
        patches = self.patch_embed(x)                                          # [B, N, D]
        time = timestep_embedding(t, cfg.dim, x.dtype)[:, None, :]             # [B, 1, D]
        label = self.label_embed(y)[:, None, :]                                # [B, 1, D]
        h = torch.cat([label, time, patches], dim=1)                           # [B, 2+N, D]
        if self.pos_embed is not None:
            h = self.pos_embed(h)
        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop() if blk.skip else None)
        h = self.decoder_pred(self.norm(h))[:, self.extras:]                   # [B, N, p*p*C]
        img = unpatchify(h, cfg.patch_size, cfg.in_chans)
        return self.final_layer(img) if self.final_layer is not None else img


def copy_weights(torch_model, model):
    """Copy a tinyuvit UViT's parameters into a TorchUViT of the same config (any dtype/device).

    Every tinyuvit parameter goes to exactly one PyTorch parameter and every PyTorch parameter
    is written once; anything left over raises, so equal parameter counts follow."""
    from ..backend import to_numpy
    modules = dict(torch_model.named_modules())
    written = set()
    with torch.no_grad():
        for name, m, key in model.named_parameters():
            mname = name.rsplit(".", 1)[0] if "." in name else ""
            tm = modules[mname]
            a = to_numpy(m.params[key])
            if isinstance(tm, nn.Linear):
                tname, a = {"W": "weight", "b": "bias"}[key], a.T          # y = x W + b vs x A^T + b
            elif isinstance(tm, (nn.LayerNorm, nn.Conv2d, nn.Embedding)):
                tname = {"W": "weight", "g": "weight", "b": "bias"}[key]
            else:
                tname = key                                                 # PosEmbed.pos
            target = getattr(tm, tname)
            if tuple(target.shape) != a.shape:
                raise ValueError(f"{name}: tinyuvit shape {a.shape}, torch shape {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(target.dtype))
            written.add(f"{mname}.{tname}" if mname else tname)
    missing = {n for n, _ in torch_model.named_parameters()} - written
    if missing:
        raise ValueError(f"torch parameters not written: {sorted(missing)}")
    return torch_model
