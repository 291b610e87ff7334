"""U-ViT: a ViT backbone for diffusion models, in NumPy with a hand-written backward.

Bao, Nie, Xue, Cao, Li, Su, Zhu, "All are Worth Words: A ViT Backbone for Diffusion Models",
CVPR 2023 (arXiv 2209.12152). Reference implementation: github.com/baofff/U-ViT, libs/uvit.py.

The network, in the order the data flows (shapes for the `tiny` preset on MNIST):

    image x_t [B, 1, 28, 28]
      -> patch_embed     patches as tokens              [B, 49, 128]
      -> label, time     one token each                 [B, 1, 128] x 2
      -> concat          [label, time, patches]         [B, 51, 128]
      -> pos_embed       + learned 1-D positions        [B, 51, 128]
      -> in_blocks       depth//2 blocks, each output pushed on a stack
      -> mid_block
      -> out_blocks      each pops a skip (last in, first out): x <- Linear(concat(x, skip))
      -> norm, decoder   LayerNorm, Linear D -> p*p*C   [B, 51, 16]
      -> drop extras     keep the patch tokens          [B, 49, 16]
      -> unpatchify                                     [B, 1, 28, 28]
      -> final conv      3x3, padding 1                 [B, 1, 28, 28]  = the prediction (v, eps or x0)

`forward(x, t, y, train=False)` is the inference path (sampling): no layer keeps anything for
backward. The shapes above are printed from the real modules by examples/walk_uvit.py.
"""
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .backend import xp_of
from .layers import (Block, Conv3x3, ConvPatchEmbed, KeyedRng, LabelEmbedding, LayerNorm, Linear, Module, PatchEmbed,
                     PosEmbed, SinCosPosEmbed, image_to_tokens, patchify, sincos_2d, timestep_embedding, tokens_to_image,
                     unpatchify)


# ----------------------------------------------------------------------------------------
# Configuration and named presets
# ----------------------------------------------------------------------------------------

# The paper's design choices (its ablation study, section 3), U-ViT's first in each row.
# Each variant is a field of UViTConfig; the branches are in UViT and layers.py.
CHOICES = {
    # long skip, h_m the main branch, h_s the skip:
    #   Linear(concat(h_m, h_s)) | h_m + h_s | h_m + Linear(h_s) | Linear(h_m + h_s) | no long skip
    "skip": ("concat", "add", "add_linear", "linear_add", "none"),
    # time: a token | adaptive LayerNorm in every block, y_s LN(h) + y_b from the time embedding
    "time_cond": ("token", "adaln"),
    # the 3x3 conv: after the linear decoder (on the image) | before it (on the tokens as an
    # image) | none
    "conv": ("after", "before", "none"),
    # patch embedding: a linear map of each patch | strided 3x3 convs then a 1x1 conv
    "patch_embed": ("linear", "conv"),
    # positions: learned 1-D | fixed 2-D sinusoidal | none
    "pos_embed": ("learned", "sincos2d", "none"),
}

# How two layers start, U-ViT's way first. Not architecture (the network and its parameter
# count stay U-ViT's), so not part of the ablation study above; the training recipe picks them.
INITS = {
    # learned positions: N(0, 0.02) as U-ViT | the patch tokens' rows start at the fixed 2-D
    # sinusoidal table (`sincos_2d`), so the grid's layout is known from step 0 and still learned
    "pos_init": ("normal", "sincos2d"),
    # the final 3x3 conv: PyTorch's uniform init as U-ViT | the identity (centre tap 1, the
    # other taps and the bias 0), so the decoder's image passes through unchanged at step 0
    "conv_init": ("uniform", "identity"),
}


def ablations():
    """The one-change variants of the ablation study: [(name, choice, overrides)], U-ViT first.

    U-ViT is every choice at its first value; each other variant changes one choice.
    """
    out = [("uvit", None, {})]
    for choice, values in CHOICES.items():
        out += [(f"{choice}={v}", choice, {choice: v}) for v in values[1:]]
    return out


def check_sizes(cfg, names):
    """ValueError unless the named fields of a transformer config are positive integers, the
    patch size divides the image size and the heads divide the width (used by UViT and ViT)."""
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"patch_size {cfg.patch_size} must divide img_size {cfg.img_size} "
                         f"(divisors: {[d for d in range(1, cfg.img_size + 1) if cfg.img_size % d == 0]})")
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"dim {cfg.dim} must be divisible by num_heads {cfg.num_heads}")


@dataclass(frozen=True)
class UViTConfig:
    img_size: int = 28
    in_chans: int = 1
    patch_size: int = 4
    dim: int = 128
    depth: int = 6          # depth//2 in-blocks + 1 mid-block + depth//2 out-blocks
    num_heads: int = 4
    mlp_ratio: int = 4
    num_classes: int = 10   # the label table has one more row: the null label
    skip: str = "concat"
    time_cond: str = "token"
    conv: str = "after"
    patch_embed: str = "linear"
    pos_embed: str = "learned"
    pos_init: str = "normal"
    conv_init: str = "uniform"

    def __post_init__(self):
        check_sizes(self, ("img_size", "in_chans", "patch_size", "dim", "num_heads", "mlp_ratio",
                           "num_classes", "depth"))
        for name, allowed in {**CHOICES, **INITS}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        p = self.patch_size
        if self.patch_embed == "conv" and (p < 2 or p & (p - 1)):
            raise ValueError(f"patch_embed 'conv' halves the image log2(patch_size) times: patch_size must be "
                             f"a power of 2 (2, 4, ...), got {p}")
        if "sincos2d" in (self.pos_embed, self.pos_init) and self.dim % 4:
            raise ValueError(f"2-D sinusoidal positions need dim divisible by 4, got {self.dim}")
        if self.pos_init != "normal" and self.pos_embed != "learned":
            raise ValueError(f"pos_init {self.pos_init!r} initialises learned positions; pos_embed is {self.pos_embed!r}")
        if self.conv_init != "uniform" and self.conv != "after":
            raise ValueError(f"conv_init {self.conv_init!r} initialises the final conv (conv 'after'); conv is {self.conv!r}")

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_blocks(self):
        return 2 * (self.depth // 2) + 1

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


# Named presets for 28x28 MNIST. Parameter counts equal the reference architecture's.
PRESETS = {
    #            patch  dim  depth (blocks)  heads   params
    "tiny":  dict(patch_size=4, dim=128, depth=6, num_heads=4),   # 7 blocks, 1,496,346
    "small": dict(patch_size=2, dim=256, depth=8, num_heads=8),   # 9 blocks, 7,682,574
}


def get_config(preset="tiny", **overrides):
    """The named preset's config, with any field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(UViTConfig(**PRESETS[preset]), **overrides)


# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------

class UViT(Module):
    """The network's prediction for a noisy image: [B, C, H, W], [B], [B] -> [B, C, H, W].

    What it predicts is the training's choice (diffusion.py): v = sqrt(abar) eps - sqrt(1 - abar) x0
    by default, or the noise eps as in U-ViT. The config's ablation choices (CHOICES) pick the
    branches marked "ablation" below; U-ViT's own choices are the unmarked path.
    """

    def __init__(self, cfg: UViTConfig, seed=0):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.dim, cfg.patch_size, cfg.in_chans
        # Every layer draws from its own generator, keyed by the seed and its attribute name
        # (layers.KeyedRng): a variant with the same seed starts every layer it shares with
        # U-ViT (same name, same shape) from U-ViT's weights, whatever it adds or reshapes.
        rng = lambda name: KeyedRng(seed, name)
        adaln = cfg.time_cond == "adaln"
        self.extras = 1 if adaln else 2     # the label token (and the time token) come before the patches
        make_block = lambda name, skip=None: Block(D, cfg.num_heads, cfg.mlp_ratio, rng(name), skip=skip, adaln=adaln)
        self.patch_embed = (ConvPatchEmbed if cfg.patch_embed == "conv" else PatchEmbed)(p, C, D, rng("patch_embed"))
        self.label_embed = LabelEmbedding(cfg.num_classes, D, rng("label_embed"))
        self.pos_embed = {"learned": lambda: PosEmbed(self.extras + cfg.num_patches, D, rng("pos_embed")),
                          "sincos2d": lambda: SinCosPosEmbed(self.extras, cfg.img_size // p, D),
                          "none": lambda: None}[cfg.pos_embed]()
        self.in_blocks = [make_block(f"in_blocks.{i}") for i in range(cfg.depth // 2)]
        self.mid_block = make_block("mid_block")
        out_skip = None if cfg.skip == "none" else cfg.skip
        self.out_blocks = [make_block(f"out_blocks.{i}", out_skip) for i in range(cfg.depth // 2)]
        self.norm = LayerNorm(D)
        self.conv_before = Conv3x3(D, D, rng("conv_before")) if cfg.conv == "before" else None
        self.decoder_pred = Linear(D, p * p * C, rng("decoder_pred"))
        self.final_layer = Conv3x3(C, C, rng("final_layer")) if cfg.conv == "after" else None
        self._init_choices()

    def _init_choices(self):
        """INITS: overwrite the U-ViT init after every layer has drawn its own (so the other
        parameters are the same whichever init is chosen)."""
        cfg = self.cfg
        if cfg.pos_init == "sincos2d":       # [1, extras + N, D]: the patch rows from the table
            self.pos_embed.params["pos"][0, self.extras:] = sincos_2d(cfg.img_size // cfg.patch_size, cfg.dim)
        if cfg.conv_init == "identity":
            W, b = self.final_layer.params["W"], self.final_layer.params["b"]   # [C, C, 3, 3], [C]
            W[...], b[...] = 0.0, 0.0
            W[:, :, 1, 1] = np.eye(cfg.in_chans)

    def check_inputs(self, x, t, y):
        """Refuse wrong shapes and labels before any computation, naming what was expected."""
        c = self.cfg
        want = (c.in_chans, c.img_size, c.img_size)
        if len(x.shape) != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")
        B = x.shape[0]
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape [{B}] (one timestep per image), got {list(t.shape)}")
        if tuple(y.shape) != (B,):
            raise ValueError(f"y must have shape [{B}] (one label per image), got {list(y.shape)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
        if B and (int(y.min()) < 0 or int(y.max()) > c.num_classes):
            raise ValueError(f"labels must lie in 0..{c.num_classes} ({c.num_classes} is the null label), "
                             f"got min {int(y.min())}, max {int(y.max())}")

    def forward(self, x, t, y, *, train=True):
        """The figure, bottom to top. `train=False` (sampling) keeps nothing for backward."""
        self.check_inputs(x, t, y)
        cfg = self.cfg
        patches = self.patch_embed(x, train=train)                         # [B, N, D]
        time = timestep_embedding(t, cfg.dim, self.dtype)                  # [B, D]
        label = self.label_embed(y, train=train)[:, None, :]               # [B, 1, D]
        xp = xp_of(label, patches)
        if cfg.time_cond == "token":
            h = xp.concatenate([label, time[:, None, :], patches], axis=1)  # [B, 2+N, D]
            e = None
        else:                       # ablation: no time token; every block's LayerNorms get the time
            h = xp.concatenate([label, patches], axis=1)                    # [B, 1+N, D]
            e = time
        if self.pos_embed is not None:
            h = self.pos_embed(h, train=train)
        skips = []
        for blk in self.in_blocks:
            h = blk(h, e=e, train=train)
            skips.append(h)
        h = self.mid_block(h, e=e, train=train)
        for blk in self.out_blocks:                                        # last in, first out
            h = blk(h, skips.pop(), e=e, train=train)
        h = self.norm(h, train=train)
        if self.conv_before is not None:  # ablation: the 3x3 conv on the patch tokens as an image
            g = cfg.img_size // cfg.patch_size
            h = tokens_to_image(h[:, self.extras:], g, g)                  # [B, D, h, w]
            h = image_to_tokens(self.conv_before(h, train=train))          # [B, N, D]
            h = self.decoder_pred(h, train=train)                          # [B, N, p*p*C]
        else:
            h = self.decoder_pred(h, train=train)                          # [B, extras+N, p*p*C]
            h = h[:, self.extras:]                                         # [B, N, p*p*C]
        img = unpatchify(h, cfg.patch_size, cfg.in_chans)                  # [B, C, H, W]
        if self.final_layer is not None:
            img = self.final_layer(img, train=train)
        return img

    def backward(self, dout):
        """dL/d(output) [B, C, H, W] -> dL/dx [B, C, H, W]; fills every parameter's grads."""
        cfg = self.cfg
        xp = xp_of(dout)
        dimg = self.final_layer.backward(dout) if self.final_layer is not None else dout
        dh = patchify(dimg, cfg.patch_size)                                # [B, N, p*p*C]
        pad = lambda d: xp.concatenate([xp.zeros((d.shape[0], self.extras, d.shape[2]), dtype=d.dtype), d], axis=1)
        if self.conv_before is not None:
            g = cfg.img_size // cfg.patch_size
            dh = tokens_to_image(self.decoder_pred.backward(dh), g, g)     # [B, D, h, w]
            dh = pad(image_to_tokens(self.conv_before.backward(dh)))       # [B, extras+N, D]
        else:
            dh = self.decoder_pred.backward(pad(dh))                       # [B, extras+N, D]
        dh = self.norm.backward(dh)
        # The out-blocks popped the in-blocks' outputs last in, first out; walking the
        # out-blocks backwards therefore meets the skips of in_blocks[0], [1], ... in order.
        dskips = []
        for blk in reversed(self.out_blocks):
            if blk.skip:
                dh, ds = blk.backward(dh)
                dskips.append(ds)
            else:
                dh = blk.backward(dh)
        dh = self.mid_block.backward(dh)
        for i in reversed(range(len(self.in_blocks))):
            if dskips:
                dh = dh + dskips[i]    # an in-block output fed both the next block and a skip
            dh = self.in_blocks[i].backward(dh)
        if self.pos_embed is not None:
            dh = self.pos_embed.backward(dh)
        self.label_embed.backward(dh[:, 0])                                # the time token has no parameters
        return self.patch_embed.backward(dh[:, self.extras:])             # [B, C, H, W]


def network_with(model_cfg: dict, backend, weights):
    """The UViT that a saved config's "model" entry describes, on `backend`, holding `weights`
    ({name: array}, moved there in the model's dtype): how saved weights become a network."""
    model = UViT(UViTConfig.from_dict(model_cfg)).to(backend)
    model.load_state_dict({k: backend.asarray(v, dtype=model.dtype) for k, v in weights.items()})
    return model
