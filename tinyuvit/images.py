"""Pictures: pixels to the model's range and back, sample grids (PNG), denoising animations
(GIF) and loss curves (PNG)."""

import numpy as np

from .backend import to_numpy
from .files import atomic_write


def to_model_range(images_uint8):
    """uint8 images [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1] (x / 127.5 - 1)."""
    x = np.asarray(images_uint8)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images [N, 28, 28] or [N, 1, 28, 28], got shape {x.shape}")
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_range(x):
    """Model-range images [N, 1, H, W] or [N, H, W] (any backend) -> uint8 [N, H, W]."""
    x = to_numpy(x)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {x.shape}")
        x = x[:, 0]
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def grid(images, nrow, pad=2, scale=2):
    """uint8 [N, H, W] -> one uint8 picture, `nrow` images per row, grey padding, upscaled."""
    n, h, w = images.shape
    ncol_rows = -(-n // nrow)
    out = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad), 96, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return np.kron(out, np.ones((scale, scale), np.uint8)) if scale > 1 else out


def save_grid(images, path, nrow=10, scale=2):
    """Save uint8 [N, H, W] (or model-range floats) as a PNG grid."""
    from PIL import Image
    if images.dtype != np.uint8:
        images = from_model_range(images)
    atomic_write(path, lambda f: Image.fromarray(grid(images, nrow, scale=scale)).save(f, format="PNG"))


def save_gif(frames, path, nrow=10, scale=2, duration_ms=60, hold_ms=1500):
    """Frames: a list of uint8 [N, H, W] stacks -> an animated GIF of grids; the last frame lingers."""
    from PIL import Image
    pics = [Image.fromarray(grid(f if f.dtype == np.uint8 else from_model_range(f), nrow, scale=scale)) for f in frames]
    durations = [duration_ms] * (len(pics) - 1) + [hold_ms]
    atomic_write(path, lambda f: pics[0].save(f, format="GIF", save_all=True, append_images=pics[1:],
                                          duration=durations, loop=0))


def plain_log_ticks(ax):
    """Label a log y axis 0.2, 0.3, 2, 20 rather than 2x10^-1, 3x10^-1, 2x10^0, 2x10^1."""
    import matplotlib.ticker
    fmt = matplotlib.ticker.FormatStrFormatter("%g")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def plot_curves(path, series, xlabel="step", title=None, logy=True):
    """A PNG line plot of {name: ys} against xs (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, lw=1.2)
    if logy:
        ax.set_yscale("log")
        plain_log_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
