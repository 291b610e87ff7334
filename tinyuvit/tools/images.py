"""Pictures: pixels to the model's range and back, sample grids (PNG), denoising animations
(GIF) and loss curves (PNG)."""

import textwrap

import numpy as np

from ..backend import to_numpy
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


# ----------------------------------------------------------------------------------------
# Pixels of generated digits beside real ones (tinyuvit evaluate --picture)
# ----------------------------------------------------------------------------------------

FAINT_RGB, SATURATED_RGB = (255, 140, 0), (0, 190, 255)   # marks: faint 1..16 orange, 255 cyan
GENERATED_COLOR, REAL_COLOR = "tab:red", "black"


def digit_tiles(images, labels, per_digit):
    """The first `per_digit` images of each digit 0..9 -> uint8 [per_digit * 10, H, W], row r holding
    the r-th image of every digit (grey tiles where a digit has fewer)."""
    labels = np.asarray(labels)
    tiles = np.full((per_digit, 10) + images.shape[1:], 96, np.uint8)   # the grid's grey
    for d in range(10):
        pick = np.flatnonzero(labels == d)[:per_digit]
        tiles[:len(pick), d] = images[pick]
    return tiles.reshape(-1, *images.shape[1:])


def mark_pixels(picture):
    """uint8 [H, W] -> RGB uint8 [H, W, 3] with faint pixels (1..16) orange and saturated ones (255) cyan."""
    rgb = np.repeat(picture[..., None], 3, axis=-1)
    rgb[(picture >= 1) & (picture <= 16)] = FAINT_RGB
    rgb[picture == 255] = SATURATED_RGB
    return rgb


def _pixel_histogram(ax, pixels):
    """Shares of pixels at each value 0..255, generated and real, on a log axis."""
    for name, color in (("generated", GENERATED_COLOR), ("real", REAL_COLOR)):
        p = pixels[name]
        hist = np.asarray(p["histogram"], np.float64)
        ax.step(np.arange(256), hist / hist.sum(), where="mid", color=color, lw=1.1,
                label=f"{name}: 0 {p['zero_share']:.1%}, 1..16 {p['faint_share']:.1%}, "
                      f"255 {p['saturated_share']:.2%}")
    ax.axvspan(0.5, 16.5, color=np.array(FAINT_RGB) / 255, alpha=0.2, lw=0, label="faint 1..16")
    ax.axvspan(254.5, 255.5, color=np.array(SATURATED_RGB) / 255, alpha=0.5, lw=0, label="saturated 255")
    ax.set_yscale("log")
    ax.set_xlim(-3, 259)
    ax.set_xlabel("pixel value")
    ax.set_ylabel("share of pixels")
    ax.set_title(f"pixel histograms, total variation distance {pixels['histogram_tv']:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center")


def _ink_bars(ax, pixels):
    """Mean ink of each digit (sum of pixels / 255), generated beside real, with the spread as error bars."""
    for k, (name, color) in enumerate((("generated", GENERATED_COLOR), ("real", REAL_COLOR))):
        p = pixels[name]
        digits = sorted(p["ink_per_digit"], key=int)
        x = np.array([int(d) for d in digits]) + (k - 0.5) * 0.4
        ax.bar(x, [p["ink_per_digit"][d] for d in digits], width=0.4, color=color, alpha=0.75,
               yerr=[p["ink_spread_per_digit"][d] for d in digits], capsize=2, error_kw=dict(lw=0.8),
               label=f"{name} (all digits: {p['ink_mean']:.1f})")
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("ink (sum of pixels / 255)")
    ax.set_title("ink per digit, mean and spread", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_pixels(path, pixels, images, labels, real_images, real_labels, per_digit=2, scale=4, title=None):
    """A PNG: the pixel histograms and the ink per digit of generated and real digits (`pixels`, a
    metrics.compare_pixels dict), above `per_digit` samples of each digit beside as many real ones
    (uint8 [N, 28, 28] with labels [N]), enlarged `scale` times with every pixel a square, as they are
    and with faint and saturated pixels marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    crops = [(f"generated: the first {per_digit} of each digit", digit_tiles(images, labels, per_digit)),
             ("real: MNIST training digits", digit_tiles(real_images, real_labels, per_digit))]
    crops = [(what, grid(tiles, nrow=10, scale=scale)) for what, tiles in crops]
    crops += [(f"{what.split(':')[0]}, marked: faint 1..16 orange, saturated 255 cyan", mark_pixels(pic))
              for what, pic in crops]
    dpi, margin, caption, plots, head = 100, 50, 26, 470, 80  # pixels; head: a title of up to 2 lines
    width = crops[0][1].shape[1] + 2 * margin
    height = head + plots + sum(caption + pic.shape[0] for _, pic in crops) + 20
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    title = textwrap.fill(title or "pixels of generated digits beside real ones", width=150)   # <= 2 lines fit
    fig.suptitle(title, y=1 - 10 / height, fontsize=12)
    bottom, top = 1 - (head + plots - 50) / height, 1 - (head + 10) / height
    _pixel_histogram(fig.add_axes([margin / width + 0.04, bottom, 0.56, top - bottom]), pixels)
    _ink_bars(fig.add_axes([0.70, bottom, 0.27, top - bottom]), pixels)
    y = head + plots                                           # from the top
    for what, pic in crops:
        fig.text(margin / width, 1 - (y + caption - 6) / height, what, fontsize=11)
        y += caption + pic.shape[0]
        rgb = pic if pic.ndim == 3 else np.repeat(pic[..., None], 3, axis=-1)
        fig.figimage(rgb, xo=margin, yo=height - y, origin="upper")   # 1:1, no resampling
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
