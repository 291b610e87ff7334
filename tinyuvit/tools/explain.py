"""See inside a trained U-ViT (`tinyuvit explain`, `Run.explain`): sample one digit and draw

    1. how the digit emerges     x_t and the network's x0 at every sampler step, with the label
                                 and with the null label, and their difference
    2. what the tokens attend to where the label and time tokens and one patch put their
                                 attention, block by block, at early, middle and late noise; the
                                 heads of one block apart; the share of attention patches give to
                                 the label and time tokens, and how far patches look
    3. what the positions learned the cosine similarity of the patches' learned position vectors,
                                 beside the 2-D sinusoidal table (Dosovitskiy et al. 2021, Fig. 7)
    4. what the long skips carry the sizes of the main and skip halves of each out-block's input,
                                 and the x0 with each long skip zeroed

Everything is read from outside the network: the sampler is handed a `Tracer` in place of the
model. It runs a replica of the network (the same weights) with a training forward, so every
Attention keeps its softmax for backward (`Attention.softmax.saved("p")`), and its out-blocks are
`SkipProbe`s, stand-ins that note the two inputs of each long skip (or zero one) before calling
the block. `UViT.forward` itself is untouched.
"""
import json
import os
from dataclasses import asdict, dataclass, field, is_dataclass

import numpy as np

from ..backend import to_numpy, xp_of
from ..errors import ConfigError
from ..layers import sincos_2d
from .files import atomic_write

LEVELS = (0.15, 0.5, 1.0)   # early, middle and late noise: these fractions of the way through the sampler's steps
MAX_COLUMNS = 20            # the emergence picture shows at most this many steps (evenly spread)
PICTURES = 8                # PNG files at most (progress counts them)


# ----------------------------------------------------------------------------------------
# Options, checked before any work
# ----------------------------------------------------------------------------------------

def check_digit(digit):
    """The digit as an int 0..9, or ConfigError."""
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise ConfigError(f"digit (--digit) must be one digit 0..9, got {digit!r}")
    return int(digit)


def check_patch(patch, grid):
    """(row, col) of a patch on the grid x grid token grid (None: chosen later), or ConfigError."""
    if patch is None:
        return None
    ok = (isinstance(patch, (tuple, list)) and len(patch) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < grid for v in patch))
    if not ok:
        raise ConfigError(f"patch (--patch) must be ROW,COL with each in 0..{grid - 1} (the {grid}x{grid} "
                          f"grid of patches), got {patch!r}")
    return int(patch[0]), int(patch[1])


def check_out_dir(path):
    """`path` as a str if pictures may be written into that folder (it need not exist yet), else
    ConfigError: a file, or a folder that cannot be made or written."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path} is a file; give a folder for the pictures")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {path}: {parent} is a file, so the folder cannot be made; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: {parent} cannot be written; choose another --out")
    return path


# ----------------------------------------------------------------------------------------
# Watching the network from outside: a probe for each long skip, a tracer for the sampler
# ----------------------------------------------------------------------------------------

def skip_parts(block, h_m, h_s):
    """(main, skip): the two terms whose sum (plus a bias) is an out-block's long-skip result, each
    [B, L, D]. concat: Linear(concat(h_m, h_s)) = h_m W_m + h_s W_s + b, W = [W_m; W_s];
    add: h_m + h_s; add_linear: h_m + Linear(h_s); linear_add: Linear(h_m + h_s) = h_m W + h_s W + b."""
    lin = block.skip_linear
    D = h_m.shape[-1]
    if block.skip == "concat":
        W = lin.params["W"]                                             # [2D, D]
        return h_m @ W[:D], h_s @ W[D:]
    if block.skip == "add":
        return h_m, h_s
    if block.skip == "add_linear":
        return h_m, lin.forward(h_s, train=False)
    return h_m @ lin.params["W"], h_s @ lin.params["W"]                 # linear_add


class SkipProbe:
    """Stands in for an out-block: notes the norms of the main and skip parts of its long skip
    (`skip_parts`) for every token, zeroes the skip input h_s if told to, then calls the block."""

    def __init__(self, block, zero=False):
        self.block, self.zero = block, zero
        self.norms = None                                               # (main, skip) [B, L] each

    def __call__(self, x, skip=None, e=None, *, train=True):
        if self.zero:
            skip = xp_of(skip).zeros_like(skip)
        if self.block.skip is not None:
            main, part = skip_parts(self.block, x, skip)                # [B, L, D] each
            self.norms = tuple(to_numpy(xp_of(a).sqrt((a * a).sum(axis=-1))) for a in (main, part))
        return self.block(x, skip, e=e, train=train)


def probed(model, zero_skip=None):
    """A replica of `model` (the same weight arrays, its own caches) whose out-blocks are
    SkipProbes; the one numbered `zero_skip` (0 = the first out-block) gets a zero skip input."""
    net = model.replica()
    net.out_blocks = [SkipProbe(b, zero=(j == zero_skip)) for j, b in enumerate(net.out_blocks)]
    return net


def blocks_of(net):
    """[(name, Block)] in the order the data passes them: 'in 1' .. 'mid' .. 'out 1' .."""
    outs = [b.block if isinstance(b, SkipProbe) else b for b in net.out_blocks]
    return ([(f"in {i + 1}", b) for i, b in enumerate(net.in_blocks)] + [("mid", net.mid_block)]
            + [(f"out {j + 1}", b) for j, b in enumerate(outs)])


def skip_names(model):
    """'in 3 -> out 1', ...: which in-block's output each out-block receives (last in, first out)."""
    n = len(model.in_blocks)
    return [f"in {n - j} -> out {j + 1}" for j in range(len(model.out_blocks))]


def attention(block):
    """The attention weights of the block's last training forward, on the host: [B, H, L, L],
    row i = where token i looks (each row sums to 1)."""
    p = to_numpy(block.attn.softmax.saved("p"))                          # [B*H, L, L]
    H = block.attn.num_heads
    return p.reshape(p.shape[0] // H, H, *p.shape[1:])


def traced_forward(net, x, t, y):
    """One forward of a probed replica -> (output [B, C, H, W], [attention [B, H, L, L] per block],
    [(main, skip) norms [B, L] per out-block, or None])."""
    out = net.forward(x, t, y, train=True)                               # train: the softmax is kept
    return out, [attention(b) for _, b in blocks_of(net)], [p.norms for p in net.out_blocks]


def forward_without_skip(model, x, t, y, j):
    """The network's output for x_t with out-block j's long-skip input set to zero."""
    return probed(model, zero_skip=j).forward(x, t, y, train=False)


@dataclass
class Step:
    """What one sampler step showed of image 0: the input x_t, the outputs for the label and the
    null label, the head-averaged attention statistics of every block and the skip norms;
    `maps` (every block's [H, L, L] attention) only at the steps kept for the attention pictures."""
    t: int
    x: np.ndarray                 # [C, H, W]
    out_label: np.ndarray         # [C, H, W]
    out_null: np.ndarray
    share: np.ndarray             # [blocks, extras]: mean attention a patch gives each extra token
    distance: np.ndarray          # [blocks]: mean distance (in patches) over which patches attend patches
    skip_norms: list              # [(main, skip) [L]] per out-block, or None
    maps: list = None             # [blocks] of [H, L, L]


class Tracer:
    """The network as a sampler calls it (`forward(x, t, y)`), watched. Each call runs the asked
    labels and the null label together through a probed replica, keeps a `Step` of image 0, and
    returns the output the sampler asked for (the doubled batch, if it asked for that)."""

    def __init__(self, model, keep=(), zero_skip=None):
        self.model, self.net = model, probed(model, zero_skip)
        self.keep, self.steps = set(keep), []
        g = model.cfg.img_size // model.cfg.patch_size
        self.dist = patch_distances(g)                                   # [N, N]

    def __getattr__(self, name):      # cfg, dtype, backend, ...: the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def forward(self, x, t, y, *, train=False):
        xp = xp_of(x)
        null = self.model.cfg.num_classes
        B = x.shape[0]
        doubled = B % 2 == 0 and bool((y[B // 2:] == null).all()) and not bool((y[:B // 2] == null).any())
        n = B // 2 if doubled else B
        if not doubled:          # add the null label's batch, so both predictions are seen
            x, t, y = xp.concatenate([x, x]), xp.concatenate([t, t]), xp.concatenate([y, xp.full_like(y, null)])
        out, maps, norms = traced_forward(self.net, x, t, y)
        self.record(x, t, out, maps, norms, n)
        return out if doubled else out[:n]

    def record(self, x, t, out, maps, norms, n):
        """Keep a Step of image 0 (its null-label twin is image n)."""
        e = self.model.extras
        mean = [m[0].mean(axis=0) for m in maps]                                    # [L, L] per block
        share = np.array([m[e:, :e].mean(axis=0) for m in mean])                    # [blocks, extras]
        distance = np.array([attention_distance(m[e:, e:], self.dist) for m in mean])
        self.steps.append(Step(
            t=int(to_numpy(t)[0]), x=to_numpy(x[0]), out_label=to_numpy(out[0]), out_null=to_numpy(out[n]),
            share=share, distance=distance,
            skip_norms=[None if v is None else (v[0][0], v[1][0]) for v in norms],
            maps=[m[0] for m in maps] if len(self.steps) in self.keep else None))


def patch_distances(grid):
    """[N, N] Euclidean distances between the patches of a grid x grid token grid, in patches."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    return np.hypot(r[:, None] - r[None, :], c[:, None] - c[None, :])


def attention_distance(a, dist):
    """The mean distance over which patches attend other patches: sum_k a[q, k] d(q, k) over the
    attention on patches, renormalised per query, averaged over the queries q. a: [N, N]."""
    return float(((a * dist).sum(axis=1) / a.sum(axis=1)).mean())


# ----------------------------------------------------------------------------------------
# Sampling one digit, traced
# ----------------------------------------------------------------------------------------

@dataclass
class Trace:
    """One sampled digit: the sampler's steps (`Step`s), its guided x0 at each step and the
    image it ended with (model range, [H, W]), and the steps kept for the attention pictures."""
    steps: list
    sigmas: np.ndarray            # [S] the noise level sqrt((1 - abar)/abar) of each step's x_t
    x0_guided: list               # [S] of [H, W]
    x0_label: list
    x0_null: list
    image: np.ndarray             # [H, W]
    levels: list = field(default_factory=list)   # step indices kept with their attention maps


def level_steps(n_steps):
    """The step indices of the early, middle and late noise levels (LEVELS), in order."""
    return sorted({min(n_steps - 1, round(f * (n_steps - 1))) for f in LEVELS})


def trace_sampling(model, diffusion, how, digit, seed, weak=None, zero_skip=None, keep=None, progress=None):
    """Sample `digit` as `Run.sample(digits=[digit], count=1, seed=seed)` does, with a Tracer in
    place of the network -> Trace. `keep`: steps whose attention maps are kept (default: LEVELS)."""
    n_steps = len(diffusion.sampler_timesteps(how))
    keep = level_steps(n_steps) if keep is None else keep
    tracer = Tracer(model, keep, zero_skip)
    labels = model.backend.xp.asarray(np.array([digit]))
    guided = []
    image = diffusion.sample(tracer, labels, np.random.default_rng(seed), how, progress=progress, weak=weak,
                             callback=lambda i, x, x0: guided.append(to_numpy(x0)[0, 0]))
    sched = diffusion.schedule
    abar = [float(sched.abar(s.t)) for s in tracer.steps]
    x0 = lambda s, out, a: diffusion.clipped(s.x[None], diffusion.x0_and_eps(s.x[None], out[None], a)[0], a)[0][0, 0]
    return Trace(steps=tracer.steps, sigmas=np.sqrt((1.0 - np.array(abar)) / np.array(abar)), x0_guided=guided,
                 x0_label=[x0(s, s.out_label, a) for s, a in zip(tracer.steps, abar)],
                 x0_null=[x0(s, s.out_null, a) for s, a in zip(tracer.steps, abar)],
                 image=to_numpy(image)[0, 0], levels=list(keep))


def most_ink(image, patch_size):
    """(row, col) of the patch with the most ink in a model-range image [H, W]."""
    g = image.shape[0] // patch_size
    ink = ((image + 1.0) / 2.0).reshape(g, patch_size, g, patch_size).sum(axis=(1, 3))   # [g, g]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(ink)), ink.shape))


# ----------------------------------------------------------------------------------------
# Measures the pictures show
# ----------------------------------------------------------------------------------------

def token_map(maps, token, extras, grid):
    """Where token `token` looks among the patches, head-averaged: [H, L, L] -> [grid, grid]."""
    return maps.mean(axis=0)[token, extras:].reshape(grid, grid)


def position_similarity(pos):
    """Cosine similarity of every pair of position vectors: [N, D] -> [N, N]."""
    pos = np.asarray(pos, dtype=np.float64)
    unit = pos / np.maximum(np.linalg.norm(pos, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def learned_positions(model):
    """The patches' learned position vectors [N, D] on the host, or None if the run learns none."""
    if model.cfg.pos_embed != "learned":
        return None
    return to_numpy(model.pos_embed.params["pos"])[0, model.extras:]


def neighbour_similarity(sim, grid):
    """Mean cosine similarity of horizontal neighbours, vertical neighbours, and patches >= 3 apart."""
    d = patch_distances(grid)
    r, c = np.divmod(np.arange(grid * grid), grid)
    same_row, same_col = r[:, None] == r[None, :], c[:, None] == c[None, :]
    return {"row_neighbours": float(sim[(d == 1) & same_row].mean()),
            "column_neighbours": float(sim[(d == 1) & same_col].mean()),
            "far_apart": float(sim[d >= 3].mean())}


def pixel_change(a, b):
    """Mean absolute difference of two model-range images, in grey levels 0..255."""
    return float(np.abs(np.clip(a, -1, 1) - np.clip(b, -1, 1)).mean() * 127.5)


# ----------------------------------------------------------------------------------------
# Drawing helpers: every figure is laid out in inches, so titles, panels and colorbars never meet
# ----------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    """Write the figure as a PNG of 256 colours (a third of the size of matplotlib's, looking the same)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    _plt().close(fig)
    picture = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    atomic_write(path, lambda f: picture.save(f, format="PNG", optimize=True))
    return path


def _figure(title, nrows, ncols, cell=(1.45, 1.45), gap=(0.15, 0.3), left=0.75, right=0.15, bottom=0.15,
            head=0.0, colorbar=False, fontsize=9):
    """A figure of nrows x ncols panels of `cell` inches with `gap` inches between them, the title
    wrapped to the width above `head` inches of column titles -> (fig, axes [nrows, ncols], cax or None)."""
    import textwrap
    plt = _plt()
    cbar = 1.1 if colorbar else 0.0
    width = left + ncols * cell[0] + (ncols - 1) * gap[0] + right + cbar
    lines = [line for part in title.split("\n") for line in textwrap.wrap(part, int(width * 72 / (0.56 * fontsize)))]
    top = 0.2 + len(lines) * fontsize * 1.3 / 72 + head
    body = nrows * cell[1] + (nrows - 1) * gap[1]
    height = top + body + bottom
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), dpi=100, squeeze=False)
    fig.subplots_adjust(left=left / width, right=(width - right - cbar) / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap[0] / cell[0], hspace=gap[1] / cell[1])
    fig.suptitle("\n".join(lines), y=1 - 0.1 / height, va="top", fontsize=fontsize)
    cax = None
    if colorbar:
        h = min(body, 3.0)
        cax = fig.add_axes([(width - cbar + 0.2) / width, (bottom + (body - h) / 2) / height, 0.14 / width, h / height])
    return fig, axes, cax


def _corner(ax, text, color="white"):
    """A small note in the panel's top-left corner, on a dark box so it reads over any colour."""
    ax.text(0.03, 0.97, text, color=color, fontsize=6.5, va="top", ha="left", transform=ax.transAxes,
            bbox=dict(boxstyle="square,pad=0.15", fc="black", alpha=0.55, lw=0))


def strip(images, gap=2):
    """[n, h, w] -> one row [h, n*(w+gap)-gap] with NaN gaps (drawn as the background)."""
    n, h, w = images.shape
    out = np.full((h, n * (w + gap) - gap), np.nan)
    for i, im in enumerate(images):
        out[:, i * (w + gap): i * (w + gap) + w] = im
    return out


def mosaic(maps, gap=1):
    """[R, C, h, w] -> one picture [R*(h+gap)-gap, C*(w+gap)-gap] with NaN gaps."""
    R, C, h, w = maps.shape
    out = np.full((R * (h + gap) - gap, C * (w + gap) - gap), np.nan)
    for r in range(R):
        for c in range(C):
            out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = maps[r, c]
    return out


def _cmap(name, bad="white"):
    import matplotlib
    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _overlay(ax, amap, image, patch=None, note=None):
    """An attention map over the patch grid (each cell one patch, black 0 .. yellow its max) with
    the image's strokes (its mid-grey contour) in cyan on top; `patch` framed in green."""
    H = image.shape[0]
    ax.imshow(amap, cmap="magma", vmin=0, vmax=max(float(amap.max()), 1e-12), extent=(0, H, H, 0),
              interpolation="nearest")
    if image.max() > 0 > image.min():
        ax.contour(np.arange(H) + 0.5, np.arange(H) + 0.5, image, levels=[0.0], colors="cyan", linewidths=0.8)
    if patch is not None:
        p = H / amap.shape[0]
        ax.add_patch(_plt().Rectangle((patch[1] * p, patch[0] * p), p, p, fill=False, ec="lime", lw=1.5))
    if note:
        _corner(ax, note)
    ax.set_xticks([])
    ax.set_yticks([])


def _attention_colorbar(fig, cax):
    import matplotlib
    sm = matplotlib.cm.ScalarMappable(cmap="magma", norm=matplotlib.colors.Normalize(0, 1))
    cb = fig.colorbar(sm, cax=cax)
    cb.set_ticks([0, 1])
    cb.set_ticklabels(["0", "the panel's\nmax"])
    cb.ax.tick_params(labelsize=7)


def _sigma_text(s):
    return f"{s:.3g}" if s < 100 else f"{s:.0f}"


def _level_title(trace, i):
    return f"step {i + 1}, sigma {_sigma_text(trace.sigmas[i])}"


# ----------------------------------------------------------------------------------------
# 1. How a digit emerges
# ----------------------------------------------------------------------------------------

def draw_emergence(trace, digit, path):
    """x_t, the sampler's x0, the x0 with the label and with the null label, and their
    difference, at every sampler step (at most MAX_COLUMNS, evenly spread) -> path."""
    S = len(trace.steps)
    cols = np.unique(np.round(np.linspace(0, S - 1, min(S, MAX_COLUMNS))).astype(int))
    diff = np.stack([trace.x0_label[i] - trace.x0_null[i] for i in cols])                 # [n, H, W]
    lim = max(float(np.abs(diff).max()), 1e-6)
    grey = lambda images: (np.stack([images[i] for i in cols]), "gray", (-1, 1))
    rows = [("x_t, the sampler's input", *grey([np.clip(s.x[0], -1, 1) for s in trace.steps])),
            ("x0 the sampler used\n(guided)", *grey(trace.x0_guided)),
            (f"x0 with label {digit}", *grey(trace.x0_label)),
            ("x0 with the null label\n(unguided)", *grey(trace.x0_null)),
            (f"label {digit} - null:\nwhat the label adds", diff, "RdBu_r", (-lim, lim))]
    n, H = len(cols), trace.image.shape[0]
    shown = "every sampler step" if n == S else f"{n} of the {S} sampler steps"
    fig, axes, cax = _figure(
        f"How a {digit} emerges: {shown}, from pure noise (left) to the clean image (right). Each column: the "
        f"noisy input x_t and what the network predicts the clean image x0 to be, with label {digit} and with "
        f"the null label (the sampler combines them with guidance). The bottom row is red where the label adds ink "
        f"to the null label's prediction and blue where it takes ink away. Under each image: the noise level sigma "
        f"of x_t.", len(rows), 1, cell=(0.72 * n, 0.72), gap=(0, 0.42), left=1.75, bottom=0.55, colorbar=True,
        fontsize=10)
    for ax, (name, ims, cmap, (lo, hi)) in zip(axes[:, 0], rows):
        im = ax.imshow(strip(ims), cmap=_cmap(cmap, "white"), vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([i * (H + 2) + H / 2 for i in range(n)])
        ax.set_xticklabels([_sigma_text(trace.sigmas[i]) for i in cols], fontsize=7)
        ax.tick_params(length=0, pad=1)
        for side in ax.spines.values():
            side.set_visible(False)
    axes[-1, 0].set_xlabel("noise level sigma of x_t at each sampler step")
    box = axes[-1, 0].get_position()                                  # the colorbar beside the last row only
    cax.set_position([cax.get_position().x0, box.y0, cax.get_position().width, box.height])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("label - null\n(x0: -1 black\n.. 1 white)", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# 2. What the tokens attend to
# ----------------------------------------------------------------------------------------

def draw_token_attention(trace, names, extras, grid, digit, path):
    """Where the label token (and the time token) put their attention over the patches, every
    block (rows) at the early, middle and late noise levels (columns) -> path."""
    tokens = [("label", 0)] + ([("time", 1)] if extras == 2 else [])
    cols = [(i, name, k) for i in trace.levels for name, k in tokens]
    no_time = "" if extras == 2 else (" This run has no time token (time_cond=adaln: the time scales and shifts "
                                      "every LayerNorm), so only the label token is drawn.")
    fig, axes, cax = _figure(
        f"Where the label token{' and the time token look' if extras == 2 else ' looks'} among the patches while a "
        f"{digit} is sampled: each panel is one token's attention over the {grid}x{grid} patches (head-averaged), "
        f"one row per block in the order the data passes them, at early, middle and late noise (columns). "
        f"Black 0 .. yellow the panel's max; top left: that max, and the share of the token's attention that goes "
        f"to patches at all (the rest goes to the {'label and time tokens' if extras == 2 else 'label token'}). "
        f"Cyan: the strokes of the network's x0 "
        f"at that step.{no_time}", len(names), len(cols), gap=(0.12, 0.12), left=0.5, head=0.35, colorbar=True)
    for c, (i, name, k) in enumerate(cols):
        axes[0, c].set_title(f"{name} token\n{_level_title(trace, i)}", fontsize=8)
        for r, bname in enumerate(names):
            amap = token_map(trace.steps[i].maps[r], k, extras, grid)
            _overlay(axes[r, c], amap, trace.x0_label[i], note=f"max {amap.max():.2f}\npatches {amap.sum():.2f}")
    for r, bname in enumerate(names):
        axes[r, 0].set_ylabel(bname, fontsize=9)
    _attention_colorbar(fig, cax)
    return _save(fig, path)


def draw_patch_attention(trace, names, extras, grid, patch, digit, path):
    """Where one patch puts its attention over the patches, every block at the three noise levels."""
    q = extras + patch[0] * grid + patch[1]
    fig, axes, cax = _figure(
        f"Where patch (row {patch[0]}, column {patch[1]}), framed green, looks while a {digit} is sampled: its "
        f"attention over the patches (head-averaged), one row per block, at early, middle and late noise. Black "
        f"0 .. yellow the panel's max; top left: that max and the share it gives the label"
        f"{' and time tokens' if extras == 2 else ' token'}. Cyan: the strokes of the network's x0 at that step.",
        len(names), len(trace.levels), gap=(0.12, 0.12), left=0.5, head=0.2, colorbar=True)
    for c, i in enumerate(trace.levels):
        axes[0, c].set_title(_level_title(trace, i), fontsize=8)
        for r, bname in enumerate(names):
            a = trace.steps[i].maps[r].mean(axis=0)[q]                                     # [L]
            extra = f"label {a[0]:.2f}" + (f"\ntime {a[1]:.2f}" if extras == 2 else "")
            _overlay(axes[r, c], a[extras:].reshape(grid, grid), trace.x0_label[i], patch=patch,
                     note=f"max {a[extras:].max():.2f}\n{extra}")
    for r, bname in enumerate(names):
        axes[r, 0].set_ylabel(bname, fontsize=9)
    _attention_colorbar(fig, cax)
    return _save(fig, path)


def draw_heads(trace, names, block, extras, grid, patch, digit, path):
    """The heads of one block apart (rows; the last row their mean) at the middle noise level:
    where the label token, the time token and the chosen patch look."""
    i = trace.levels[len(trace.levels) // 2]
    maps = trace.steps[i].maps[block]                                                   # [H, L, L]
    H = maps.shape[0]
    q = extras + patch[0] * grid + patch[1]
    cols = ([("label token", 0)] + ([("time token", 1)] if extras == 2 else [])
            + [(f"patch ({patch[0]}, {patch[1]})", q)])
    fig, axes, cax = _figure(
        f"The {H} heads of block '{names[block]}' apart ({_level_title(trace, i)}, digit {digit}), and their mean "
        f"(last row): where the label token{', the time token' if extras == 2 else ''} and the framed patch look "
        f"among the patches. Black 0 .. yellow the panel's max; 'patches' = the share of the attention on patches "
        f"at all; 'reach' = the mean distance, in patches, over which that head's patches look at patches.",
        H + 1, len(cols), gap=(0.12, 0.12), left=0.85, head=0.2, colorbar=True)
    dist = patch_distances(grid)
    for r in range(H + 1):
        a = maps[r] if r < H else maps.mean(axis=0)                                     # [L, L]
        for c, (cname, k) in enumerate(cols):
            amap = a[k, extras:].reshape(grid, grid)
            _overlay(axes[r, c], amap, trace.x0_label[i], patch=patch if k == q else None,
                     note=f"max {amap.max():.2f}\npatches {amap.sum():.2f}")
            if r == 0:
                axes[r, c].set_title(cname, fontsize=9)
        reach = attention_distance(a[extras:, extras:], dist)
        axes[r, 0].set_ylabel((f"head {r + 1}" if r < H else "mean") + f"\nreach {reach:.2f}", fontsize=8)
    _attention_colorbar(fig, cax)
    return _save(fig, path)


def draw_attention_share(trace, names, extras, grid, path):
    """Block by block, one line per sampler step coloured by its noise level: the share of attention
    patches give the label token and the time token, and how far patches look among patches."""
    import matplotlib
    L = extras + grid * grid
    share = np.stack([s.share for s in trace.steps])                                    # [S, blocks, extras]
    dist = np.stack([s.distance for s in trace.steps])                                  # [S, blocks]
    panels = [("to the label token", share[:, :, 0], 1 / L, "uniform attention, 1/L",
               "share of a patch's attention")]
    if extras == 2:
        panels.append(("to the time token", share[:, :, 1], 1 / L, "uniform attention, 1/L",
                       "share of a patch's attention"))
    panels.append(("reach among the patches", dist, float(patch_distances(grid).mean()), "uniform over the patches",
                   "mean distance attended (in patches)"))
    no_time = "" if extras == 2 else " This run has no time token (time_cond=adaln)."
    fig, axes, cax = _figure(
        "How much attention the patches give the extra tokens, and how far they look among the patches, block "
        "by block: the mean over all patches of their head-averaged attention, one line per sampler step, "
        "coloured by its noise level sigma. Dashed: what uniform attention would give." + no_time,
        1, len(panels), cell=(4.0, 3.0), gap=(1.1, 0.3), left=1.1, bottom=0.65, head=0.3, colorbar=True)
    norm = matplotlib.colors.LogNorm(vmin=trace.sigmas.min(), vmax=trace.sigmas.max())
    cmap = matplotlib.colormaps["viridis"]
    x = np.arange(len(names))
    for ax, (title, ys, base, base_label, ylabel) in zip(axes[0], panels):
        for s in range(len(ys)):
            ax.plot(x, ys[s], color=cmap(norm(trace.sigmas[s])), lw=1.1, marker="o", ms=2.5)
        ax.axhline(base, color="black", ls="--", lw=0.9, label=base_label)
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.set_xlabel("block, in the order the data passes them")
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.set_label("noise level sigma of the step", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# 3. What the positions learned
# ----------------------------------------------------------------------------------------

def draw_positions(sim_trained, sim_start, grid, start_text, path):
    """Grids of grid x grid maps: map (r, c) is the cosine similarity of patch (r, c)'s position
    vector with every patch's; the trained run beside the 2-D sinusoidal table and their difference."""
    panels = [("learned positions of this run", sim_trained)]
    if sim_start is not None:
        panels += [(start_text, sim_start), ("learned - table", sim_trained - sim_start)]
    off = ~np.eye(len(sim_trained), dtype=bool)
    lo = min(float(p[off].min()) for _, p in panels[:2])
    fig, axes, _ = _figure(
        "What the positions learned: the small map at (row r, column c) is the cosine similarity of patch (r, c)'s "
        "position vector with every patch's (the ViT paper's Fig. 7); its brightest cell is the patch itself. "
        "Maps that peak around their own place, brighter along its row and column, mean the network can tell where "
        "a patch lies in 2-D.", 1, len(panels), cell=(4.2, 4.2), gap=(1.2, 0.3), left=0.65, right=0.3,
        bottom=0.95, head=0.45)
    for k, (ax, (title, sim)) in enumerate(zip(axes[0], panels)):
        diff = k == 2
        lim = max(float(np.abs(sim).max()), 1e-6)
        im = ax.imshow(mosaic(sim.reshape(grid, grid, grid, grid)), cmap=_cmap("RdBu_r" if diff else "viridis"),
                       vmin=-lim if diff else lo, vmax=lim if diff else 1.0, interpolation="nearest")
        ticks = range(0, grid, max(1, grid // 7))
        ax.set_xticks([c * (grid + 1) + grid / 2 - 0.5 for c in ticks])
        ax.set_xticklabels(ticks)
        ax.set_yticks([r * (grid + 1) + grid / 2 - 0.5 for r in ticks])
        ax.set_yticklabels(ticks)
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row")
        if diff:
            ax.set_title(f"{title}\n(red: more alike after training)", fontsize=9)
        else:
            nb = neighbour_similarity(sim, grid)
            ax.set_title(f"{title}\nneighbours in a row {nb['row_neighbours']:.2f}, in a column "
                         f"{nb['column_neighbours']:.2f}; >= 3 apart {nb['far_apart']:.2f}", fontsize=9)
        cb = fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.12)
        cb.set_label("change of cosine similarity" if diff else "cosine similarity", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# 4. What the long skips carry
# ----------------------------------------------------------------------------------------

SKIP_FORMS = {"concat": "h_m W_m and h_s W_s, the two halves of Linear(concat(h_m, h_s))",
              "add": "h_m and h_s of h_m + h_s (no Linear: the skip is added as it is)",
              "add_linear": "h_m and Linear(h_s) of h_m + Linear(h_s)",
              "linear_add": "h_m W and h_s W of Linear(h_m + h_s)"}


def skip_series(trace, extras):
    """[S, out-blocks, 2]: the mean norm over the patch tokens of the main and the skip part."""
    return np.array([[(m[extras:].mean(), s[extras:].mean()) for m, s in step.skip_norms] for step in trace.steps])


def draw_skip_norms(trace, names, form, extras, path):
    """For each out-block, the sizes of the main and skip parts of its long-skip result at every
    sampler step, and their ratio."""
    plt = _plt()
    series = skip_series(trace, extras)                                                 # [S, J, 2]
    x = np.arange(len(trace.steps))
    fig, axes, _ = _figure(
        f"What the long skips carry, on this digit: each out-block j gets the main path h_m and, over a long skip, "
        f"the output h_s of in-block k (in k -> out j). Left: the size of the two parts it adds, {SKIP_FORMS[form]} "
        f"(the mean norm over the patch tokens), at every sampler step; right: skip part / main part.",
        1, 2, cell=(5.2, 3.2), gap=(0.9, 0.3), left=0.75, bottom=0.65, head=0.3)
    a1, a2 = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, name in enumerate(names):
        col = colors[j % len(colors)]
        a1.plot(x, series[:, j, 0], color=col, lw=1.4, label=f"{name}: main")
        a1.plot(x, series[:, j, 1], color=col, lw=1.4, ls="--", label=f"{name}: skip")
        a2.plot(x, series[:, j, 1] / series[:, j, 0], color=col, lw=1.4, marker="o", ms=3, label=name)
    ticks = x[:: max(1, len(x) // 10)]
    for ax in (a1, a2):
        ax.set_xticks(ticks)
        ax.set_xticklabels([_sigma_text(trace.sigmas[i]) for i in ticks], fontsize=8)
        ax.set_xlabel("noise level sigma of the sampler step (pure noise -> clean)")
        ax.grid(alpha=0.3)
    a1.set_ylabel("mean norm over the patch tokens")
    a1.set_title("size of the main part (solid) and the skip part (dashed)", fontsize=9)
    a1.legend(fontsize=7, ncol=2)
    a2.axhline(1.0, color="black", lw=0.8, ls=":")
    a2.set_ylabel("skip part / main part")
    a2.set_title("how much the skip carries against the main path", fontsize=9)
    a2.legend(fontsize=8)
    return _save(fig, path)


def draw_zeroed_skips(rows, columns, digit, path):
    """Rows: the intact network, then each long skip zeroed; columns: the x0 at the three noise
    levels (from the intact sampler's x_t) and the digit sampled all the way with the skip zeroed."""
    fig, axes, _ = _figure(
        f"Each long skip zeroed at sampling time (rows; digit {digit}). The first columns: the network's x0 from the "
        f"same x_t as the intact sampler's, at early, middle and late noise; the last column: the digit sampled all "
        f"the way with that skip zeroed. Top left: the mean absolute difference from the intact image in grey "
        f"levels (0..255).", len(rows), len(columns), cell=(1.6, 1.6), gap=(0.12, 0.12), left=0.95, head=0.35)
    for r, (name, images, changes) in enumerate(rows):
        for c, im in enumerate(images):
            ax = axes[r, c]
            ax.imshow(np.clip(im, -1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if changes is not None:
                _corner(ax, f"change {changes[c]:.1f}", color="yellow")
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# All of it
# ----------------------------------------------------------------------------------------

@dataclass
class Scene:
    """What every part of `explain` draws from: the run, the traced digit and where the PNGs go."""
    model: object
    diffusion: object
    how: object
    digit: int
    seed: int
    weak: object
    trace: Trace
    patch: tuple
    out_dir: str
    note: object                  # note(line): a part this run does not have
    bar: object                   # the progress bar

    def path(self, name):
        return os.path.join(self.out_dir, name)


def explain(model, diffusion, how, out_dir, digit=3, seed=0, patch=None, weak=None, progress=True, log=None):
    """Sample one `digit` (with sampling settings `how`, the early weights `weak` for autoguidance)
    and write the pictures 1-4 into `out_dir`, with the numbers they show in explain.json
    -> {"files", "notes", "measures", "patch", "how", "image" (the sampled digit, [H, W] in [-1, 1])}.
    `log(line)` hears the notes (parts this run does not have); `progress`: a progress bar."""
    from .progress import Progress
    cfg = model.cfg
    digit = check_digit(digit)
    patch = check_patch(patch, cfg.img_size // cfg.patch_size)
    out_dir = check_out_dir(out_dir)
    n_steps = len(diffusion.sampler_timesteps(how))
    notes, files = [], []
    measures = {"digit": digit, "seed": seed, "steps": n_steps,
                "sampling": asdict(how) if is_dataclass(how) else repr(how)}

    def note(line):
        notes.append(line)
        (log or (lambda line: None))(line)

    total = n_steps * (1 + len(model.out_blocks)) + PICTURES
    with one_blas_thread(model), Progress(total, "explain", unit="step", disable=not progress) as bar:
        trace = trace_sampling(model, diffusion, how, digit, seed, weak, progress=bar)
        os.makedirs(out_dir, exist_ok=True)
        patch = patch or most_ink(trace.image, cfg.patch_size)
        measures.update(sigmas=[float(s) for s in trace.sigmas], levels=trace.levels, patch=list(patch))
        scene = Scene(model, diffusion, how, digit, seed, weak, trace, patch, out_dir, note, bar)
        for part in (emergence_part, attention_part, positions_part, skips_part):
            drawn, numbers = part(scene)
            files += drawn
            measures.update(numbers)
        measures["notes"] = notes
        path = scene.path("explain.json")
        atomic_write(path, lambda f: f.write(json.dumps(measures, indent=1).encode()))
        files.append(path)
        bar.update(bar.total - bar.n)
    return {"files": files, "notes": notes, "measures": measures, "patch": patch, "how": how, "image": trace.image}


def emergence_part(scene):
    """Picture 1 -> ([PNG], {"label_adds": the mean |x0 label - x0 null| per step, grey levels})."""
    trace = scene.trace
    files = [draw_emergence(trace, scene.digit, scene.path("explain_1_emergence.png"))]
    scene.bar.update(1)
    return files, {"label_adds": [pixel_change(a, b) for a, b in zip(trace.x0_label, trace.x0_null)]}


def attention_part(scene):
    """The four pictures of 2 -> ([PNGs], {"attention": the numbers they show})."""
    model, trace, patch, path = scene.model, scene.trace, scene.patch, scene.path
    grid, extras = model.cfg.img_size // model.cfg.patch_size, model.extras
    names = [n for n, _ in blocks_of(model)]
    if extras == 1:
        scene.note("this run has no time token (time_cond=adaln: the time scales and shifts every LayerNorm); "
                   "the attention pictures show the label token only")
    files = [draw_token_attention(trace, names, extras, grid, scene.digit, path("explain_2_tokens.png")),
             draw_patch_attention(trace, names, extras, grid, patch, scene.digit, path("explain_2_patch.png")),
             draw_heads(trace, names, len(model.in_blocks), extras, grid, patch, scene.digit,
                        path("explain_2_heads.png")),
             draw_attention_share(trace, names, extras, grid, path("explain_2_share.png"))]
    scene.bar.update(len(files))
    return files, {"attention": attention_measures(trace, names, extras, grid, patch)}


def positions_part(scene):
    """Picture 3, or a note where the run learns no positions -> ([PNG], {"positions": ...})."""
    cfg, model = scene.model.cfg, scene.model
    grid = cfg.img_size // cfg.patch_size
    scene.bar.update(1)
    pos = learned_positions(model)
    if pos is None:
        scene.note(f"this run learns no positions (pos_embed={cfg.pos_embed}: "
                   + ("the fixed 2-D sinusoidal table" if cfg.pos_embed == "sincos2d" else "none at all")
                   + "); no positions picture")
        return [], {}
    sim, start, began = position_similarity(pos), None, None
    numbers = {"trained": neighbour_similarity(sim, grid)}
    if cfg.dim % 4:
        scene.note(f"width {cfg.dim} is not divisible by 4: no 2-D sinusoidal table to compare with")
    else:
        start = position_similarity(sincos_2d(grid, cfg.dim))
        began = ("the 2-D sinusoidal table: where this run started" if cfg.pos_init == "sincos2d"
                 else "the 2-D sinusoidal table (for reference: this run started from N(0, 0.02))")
        off = ~np.eye(len(sim), dtype=bool)
        numbers.update(sincos2d=neighbour_similarity(start, grid),
                       correlation_with_sincos2d=float(np.corrcoef(sim[off], start[off])[0, 1]))
    files = [draw_positions(sim, start, grid, began, scene.path("explain_3_positions.png"))]
    return files, {"positions": numbers}


def skips_part(scene):
    """The two pictures of 4, or a note where the run has no long skips -> ([PNGs], {...})."""
    model, trace = scene.model, scene.trace
    if model.cfg.skip == "none" or not model.out_blocks:
        scene.note(f"this run has no long skips ({'skip=none' if model.cfg.skip == 'none' else 'no out-blocks'}); "
                   "no skip pictures")
        return [], {}
    names = skip_names(model)
    series = skip_series(trace, model.extras)                                           # [S, J, 2]
    rows, zeroed = zeroed_skips(scene)
    columns = [_level_title(trace, i) for i in trace.levels] + ["sampled all the way"]
    files = [draw_skip_norms(trace, names, model.cfg.skip, model.extras, scene.path("explain_4_skip_norms.png")),
             draw_zeroed_skips(rows, columns, scene.digit, scene.path("explain_4_skips_zeroed.png"))]
    return files, {"skips": {n: {"main": series[:, j, 0].tolist(), "skip": series[:, j, 1].tolist()}
                             for j, n in enumerate(names)},
                   "skips_zeroed": zeroed}


def one_blas_thread(model):
    """A context in which NumPy's matrix products use one thread: this batch of two images is far
    too small to share out, and BLAS threads that wait for a busy core spin (3x slower here)."""
    import contextlib
    if model.xp is not np:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


def attention_measures(trace, names, extras, grid, patch):
    """The numbers behind the attention pictures: per block, at each kept level and over all steps."""
    share = np.stack([s.share for s in trace.steps])                                    # [S, blocks, extras]
    dist = np.stack([s.distance for s in trace.steps])                                  # [S, blocks]
    out = {"blocks": names, "uniform_share": 1.0 / (extras + grid * grid),
           "uniform_distance": float(patch_distances(grid).mean()),
           "label_share": share[:, :, 0].tolist(), "distance": dist.tolist()}
    if extras == 2:
        out["time_share"] = share[:, :, 1].tolist()
    q = extras + patch[0] * grid + patch[1]
    for i in trace.levels:
        maps = trace.steps[i].maps
        ink = (trace.x0_label[i] > 0).reshape(grid, trace.image.shape[0] // grid, grid, -1).any(axis=(1, 3))
        label = [token_map(m, 0, extras, grid) for m in maps]
        out[f"step_{i}"] = {
            "sigma": float(trace.sigmas[i]),
            # the share of the label token's patch attention on patches with ink (x0 > 0 somewhere in them)
            "label_on_ink": [float(a[ink].sum() / a.sum()) for a in label],
            "ink_patches": float(ink.mean()),
            "label_max": [float(a.max()) for a in label],
            "patch_self": [float(m.mean(axis=0)[q, q]) for m in maps],
        }
    return out


def zeroed_skips(scene):
    """Rows for `draw_zeroed_skips` (intact, then each skip zeroed) and the mean pixel changes they show."""
    model, diffusion, trace = scene.model, scene.diffusion, scene.trace
    xp = model.backend.xp
    y = xp.asarray(np.array([scene.digit]))
    intact = [trace.x0_label[i] for i in trace.levels] + [trace.image]
    rows, changes = [("intact", intact, None)], {}
    for j, name in enumerate(skip_names(model)):
        images = []
        for i in trace.levels:                       # x0 from the intact sampler's x_t, this skip zeroed
            s = trace.steps[i]
            x = xp.asarray(s.x[None])                                                   # [1, C, H, W]
            out = forward_without_skip(model, x, xp.asarray(np.array([s.t])), y, j)
            a = float(diffusion.schedule.abar(s.t)); x0, _ = diffusion.clipped(x, diffusion.x0_and_eps(x, out, a)[0], a)
            images.append(to_numpy(x0)[0, 0])
        images.append(trace_sampling(model, diffusion, scene.how, scene.digit, scene.seed, scene.weak, zero_skip=j,
                                     keep=(), progress=scene.bar).image)     # sampled all the way without it
        change = [pixel_change(a, b) for a, b in zip(images, intact)]
        rows.append((f"{name}\nzeroed", images, change))
        changes[name] = {"x0_at_levels": change[:-1], "sampled": change[-1]}
    return rows, changes
