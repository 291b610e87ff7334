"""A Vision Transformer classifier for MNIST, built from tinyuvit's layers, with a hand-written backward.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (arXiv 2010.11929). The same
blocks as U-ViT, used the ordinary way: a class token is read out by a linear head. tinyuvit uses
it to score generated digits (tinyuvit.tools.metrics): its penultimate features give a FID, its
predictions a class accuracy.

    image x [B, 1, 28, 28]  in [-1, 1]                      (shapes for patch 7, N = 16 patches)
      -> patch_embed    patches as tokens                   [B, 16, D]
      -> class token    a learned token put at position 0   [B, 17, D]
      -> pos_embed      + learned 1-D positions             [B, 17, D]
      -> blocks         pre-norm transformer blocks         [B, 17, D]
      -> norm           LayerNorm of the class token        [B, D]     = features(x)
      -> head           Linear D -> 10                      [B, 10]    = forward(x), the logits

The shipped classifier, tinyuvit/assets/classifier.npz (538,634 parameters, 2.0 MB), is what the
defaults here produce; it was made with

    from tinyuvit.tools.vit import train_classifier     # run with OPENBLAS_NUM_THREADS=1
    train_classifier("tinyuvit/assets/classifier.npz", data_dir="/work/shared/data/mnist")

i.e. ViTConfig(patch_size=7, dim=128, depth=4, num_heads=4, mlp_ratio=2) (16 patch tokens + the
class token), 18 epochs = 8,438 steps of 128 on the 60,000 training digits, each shifted by up to
1 px; AdamW lr 2e-3 (5% linear warmup, cosine to 0), weight decay 0.05 on matrices; seed 0;
float32 on the CPU. It took 873 s (14.5 min, 1,238 img/s) on a shared 2-core machine and reaches
**99.33% test accuracy** (67 of the 10,000 test digits wrong). Single-threaded BLAS was as fast
as two threads for these small matrices, and much faster when other work shares the cores.
Patch 7 beat patch 4 for a fixed CPU budget: patch 4, dim 64, depth 4 (3x the tokens) reached
only 98.73% after 12 epochs (14 min).
"""
import json
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..backend import Backend, synchronize, to_numpy, xp_of
from .files import atomic_write
from ..layers import Block, LayerNorm, Linear, Module, PatchEmbed, PosEmbed
from ..model import check_sizes
from ..optim import AdamW, lr_at
from .progress import Progress


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 28
    in_chans: int = 1
    patch_size: int = 7
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 2
    num_classes: int = 10

    def __post_init__(self):
        check_sizes(self, [f.name for f in fields(self)])

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ViT config fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------

class ViT(Module):
    """Logits [B, num_classes] for images [B, C, H, W]; `features` gives the [B, D] before the head."""

    def __init__(self, cfg: ViTConfig = ViTConfig(), seed=0):
        super().__init__()
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        D = cfg.dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, rng)
        self.params["cls"] = rng.normal(0.0, 0.02, (1, 1, D))           # the class token
        self.pos_embed = PosEmbed(1 + cfg.num_patches, D, rng)
        self.blocks = [Block(D, cfg.num_heads, cfg.mlp_ratio, rng) for _ in range(cfg.depth)]
        self.norm = LayerNorm(D)
        self.head = Linear(D, cfg.num_classes, rng)

    def check_inputs(self, x):
        c = self.cfg
        want = (c.in_chans, c.img_size, c.img_size)
        if len(x.shape) != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")

    def features(self, x, *, train=True):  # [B, C, H, W] -> [B, D]
        """The penultimate features; `train=False` keeps nothing for backward."""
        self.check_inputs(x)
        cls = self.params["cls"]
        xp = xp_of(x, cls)
        tokens = self.patch_embed(x, train=train)                        # [B, N, D]
        B, N, D = tokens.shape
        cls = xp.zeros((B, 1, D), dtype=tokens.dtype) + cls              # [B, 1, D]
        h = self.pos_embed(xp.concatenate([cls, tokens], axis=1), train=train)  # [B, 1+N, D]
        for blk in self.blocks:
            h = blk(h, train=train)
        return self.norm(h[:, 0], train=train)                           # [B, D]

    def forward(self, x, *, train=True):  # [B, C, H, W] -> [B, num_classes]
        return self.head(self.features(x, train=train), train=train)

    # Only the class token reaches the head, so the gradient enters the last block at
    # position 0 and zero elsewhere; the class token itself was copied to every image, so its
    # gradient is the sum over the batch of the gradient at position 0.
    def backward(self, dlogits):
        """dL/dlogits [B, K] -> dL/dx [B, C, H, W]; fills every parameter's grads."""
        return self.backward_features(self.head.backward(dlogits))

    def backward_features(self, dfeat):  # [B, D] -> [B, C, H, W]
        xp = xp_of(dfeat)
        dcls = self.norm.backward(dfeat)                                 # [B, D]
        B, D = dcls.shape
        N = self.cfg.num_patches
        dh = xp.concatenate([dcls[:, None], xp.zeros((B, N, D), dtype=dcls.dtype)], axis=1)
        for blk in reversed(self.blocks):
            dh = blk.backward(dh)                                        # [B, 1+N, D]
        dh = self.pos_embed.backward(dh)
        self.grads["cls"] = dh[:, :1].sum(axis=0, keepdims=True)         # [1, 1, D]
        return self.patch_embed.backward(dh[:, 1:])

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, path, meta=None):
        """Weights as float32 under their flat names, the config (and `meta`) as JSON strings."""
        arrays = {name: to_numpy(a).astype(np.float32) for name, a in self.state_dict().items()}
        arrays["config"] = np.array(json.dumps(self.cfg.to_dict()))
        if meta is not None:
            arrays["meta"] = np.array(json.dumps(meta))
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))  # a file object: no ".npz" added

    @classmethod
    def load(cls, path, backend=None):
        """The ViT saved at `path`, moved to `backend` (default: CPU float32)."""
        with np.load(path, allow_pickle=False) as z:
            cfg = ViTConfig.from_dict(json.loads(str(z["config"])))
            state = {k: z[k] for k in z.files if k not in ("config", "meta")}
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        model = cls(cfg)
        model.load_state_dict(state)
        model.meta = meta
        return model.to(backend or Backend("cpu", "float32"))


# ----------------------------------------------------------------------------------------
# Softmax cross-entropy
# ----------------------------------------------------------------------------------------

class SoftmaxCrossEntropy:
    """L = mean_b -log softmax(z_b)[y_b].

    With p = softmax(z):  dL/dz_b = (p_b - onehot(y_b)) / B.
    """

    def forward(self, logits, labels):  # [B, K], [B] ints -> scalar
        xp = xp_of(logits)
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))        # [B, K], log softmax
        self.p, self.labels = xp.exp(logp), labels
        return -logp[xp.arange(len(labels)), labels].mean()

    __call__ = forward

    def backward(self, dloss=1.0):  # -> [B, K]
        xp = xp_of(self.p)
        B, K = self.p.shape
        onehot = (self.labels[:, None] == xp.arange(K)[None, :]).astype(self.p.dtype)
        return (self.p - onehot) * (dloss / B)


# ----------------------------------------------------------------------------------------
# Training: AdamW with warmup + cosine decay, random shifts as augmentation
# ----------------------------------------------------------------------------------------

def random_shift(x, max_shift, rng):
    """Shift each image [B, C, H, W] by up to `max_shift` px each way, filling with the background -1."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    s = max_shift
    pad = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=-1.0)   # [B, C, H+2s, W+2s]
    oy, ox = rng.integers(0, 2 * s + 1, size=(2, B))
    rows = oy[:, None] + np.arange(H)                                         # [B, H]
    cols = ox[:, None] + np.arange(W)                                         # [B, W]
    b = np.arange(B)[:, None, None]
    out = pad.transpose(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]    # [B, H, W, C]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def predict_logits(model, images, batch_size=1000):
    """Logits [N, K] (host float64) for host images [N, C, H, W], batch by batch."""
    out = []
    for i in range(0, len(images), batch_size):
        x = model.xp.asarray(images[i:i + batch_size], dtype=model.dtype)
        out.append(to_numpy(model(x, train=False)).astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, model.cfg.num_classes))


def accuracy(model, images, labels, batch_size=1000):
    return float((predict_logits(model, images, batch_size).argmax(-1) == np.asarray(labels)).mean())


def fit(model, train_x, train_y, steps, batch_size=128, lr=2e-3, weight_decay=0.05, warmup=None,
        max_shift=1, seed=0, progress=True, desc="train-classifier"):
    """Train `model` in place on host arrays train_x [N, C, H, W] float32 in [-1, 1], train_y [N].

    Returns (final running loss, final running accuracy, images per second).
    """
    xp, dtype = model.xp, model.dtype
    rng = np.random.default_rng(seed + 1)          # batches and shifts (seed: the init)
    warmup = max(1, steps // 20) if warmup is None else warmup
    params = model.state_dict()
    opt = AdamW(params, lr=lr, weight_decay=weight_decay,
                decay=lambda name, p: p.ndim == 2)  # weight matrices; not biases, LayerNorm, tokens
    loss_fn = SoftmaxCrossEntropy()
    N = len(train_x)
    order, pos = rng.permutation(N), 0
    run_loss = run_acc = None
    t0 = time.perf_counter()
    with Progress(steps, desc, unit="step", disable=not progress) as bar:
        for step in range(steps):
            if pos + batch_size > N:                                   # a new epoch
                order, pos = rng.permutation(N), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            x = xp.asarray(random_shift(train_x[idx], max_shift, rng), dtype=dtype)
            y = xp.asarray(train_y[idx])
            logits = model(x)
            loss = float(loss_fn(logits, y))
            model.backward(loss_fn.backward())
            opt.step(model.grad_dict(), lr_at(step, lr, warmup, steps, "cosine"))
            acc = float((logits.argmax(-1) == y).mean())
            run_loss = loss if run_loss is None else 0.98 * run_loss + 0.02 * loss
            run_acc = acc if run_acc is None else 0.98 * run_acc + 0.02 * acc
            if progress and (step % 10 == 0 or step == steps - 1):
                synchronize()
                rate = (step + 1) * batch_size / (time.perf_counter() - t0)
                bar.update(step + 1 - bar.n, loss=f"{run_loss:.4f}", acc=f"{run_acc:.4f}",
                           **{"img/s": f"{rate:.0f}"})
    synchronize()
    return run_loss, run_acc, steps * batch_size / (time.perf_counter() - t0)


def _check_classifier_options(epochs, batch_size, lr, steps, weight_decay, max_shift):
    """ConfigError, naming the option as the command line spells it, for a value out of range."""
    import math

    from ..errors import ConfigError

    def number(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    def count(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not count(batch_size) or batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not number(lr) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--lr must be a finite number > 0, got {lr!r}")
    if steps is None and (not number(epochs) or not math.isfinite(epochs) or epochs <= 0):
        raise ConfigError(f"--epochs must be a finite number > 0, got {epochs!r}")
    if steps is not None and (not count(steps) or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not count(max_shift) or max_shift < 0:
        raise ConfigError(f"max_shift must be an integer >= 0, got {max_shift!r}")


def train_classifier(out_path, epochs=18, batch_size=128, lr=2e-3, seed=0, data_dir=None,
                     device="cpu", progress=True, steps=None, config=None, weight_decay=0.05,
                     max_shift=1, dtype="float32", download=True):
    """Train a ViT on the 60,000 MNIST training digits, save it to `out_path`, report test accuracy.

    `steps` (optimizer steps) overrides `epochs`; `config` is a ViTConfig (default: ViTConfig()).
    Returns a dict: test_accuracy, train_loss, train_accuracy, steps, epochs, seconds, img_per_s,
    num_params, config, data (where the digits came from), out_path. The weights are saved with
    these results (less out_path) as the checkpoint's "meta".
    Options out of range are a ConfigError before anything starts (the output path too:
    files.check_output_path); weights that training made NaN are a TrainingError, and nothing
    is saved.
    """
    from .data import load_mnist
    from ..errors import ConfigError, TrainingError
    from .files import check_output_path
    from .images import to_model_range

    _check_classifier_options(epochs, batch_size, lr, steps, weight_decay, max_shift)
    check_output_path(out_path, (".npz",), "--out")
    cfg = config or ViTConfig()
    train_u8, train_y, source = load_mnist("train", data_dir=data_dir, download=download, quiet=not progress)
    test_u8, test_y, _ = load_mnist("test", data_dir=data_dir, download=download, quiet=not progress)
    train_x, test_x = to_model_range(train_u8), to_model_range(test_u8)    # [N, 1, 28, 28]
    steps = int(steps) if steps is not None else int(round(epochs * len(train_x) / batch_size))
    if steps < 1:
        raise ConfigError(f"--epochs {epochs:g} trains 0 steps of {batch_size} on "
                          f"{len(train_x)} digits; give --epochs >= {batch_size / len(train_x):.2g}")

    model = ViT(cfg, seed=seed).to(Backend(device, dtype))
    t0 = time.perf_counter()
    loss, acc, rate = fit(model, train_x, np.asarray(train_y), steps, batch_size, lr, weight_decay,
                          max_shift=max_shift, seed=seed, progress=progress)
    train_seconds = time.perf_counter() - t0
    bad = [name for name, a in model.state_dict().items() if not bool(xp_of(a).isfinite(a).all())]
    if bad:
        raise TrainingError(f"classifier training diverged: after {steps} steps {len(bad)} weight "
                            f"arrays (e.g. {bad[0]}) hold NaN or infinite values (final loss {loss:.4g}); "
                            f"nothing was saved to {out_path}. Try a lower --lr")
    test_acc = accuracy(model, test_x, test_y)
    results = dict(test_accuracy=test_acc, train_loss=loss, train_accuracy=acc, steps=steps,
                   epochs=steps * batch_size / len(train_x), batch_size=batch_size, lr=lr, seed=seed,
                   seconds=train_seconds, img_per_s=rate, num_params=model.num_params(),
                   config=cfg.to_dict(), device=device, dtype=dtype, data=source, out_path=str(out_path))
    model.save(out_path, meta={k: v for k, v in results.items() if k != "out_path"})
    return results
