"""Walk one real MNIST digit through U-ViT and print the shape of the data at every stage.

    python examples/walk_uvit.py [--preset tiny] [--t 500] [--digit 7]

The stages are printed by UViT.forward itself (its `trace` hook), so this is the real code path:
the paper's Figure 1 read from bottom (patches, time, label) to top (the predicted noise).
"""
import argparse

import numpy as np

from tinyuvit.backend import Backend
from tinyuvit.data import load_mnist
from tinyuvit.diffusion import Schedule
from tinyuvit.images import to_model_range
from tinyuvit.model import UViT, get_config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--t", type=int, default=500, help="timestep to noise the digit to (0..999)")
    ap.add_argument("--digit", type=int, default=7, help="which digit to take from the test set")
    args = ap.parse_args()

    images, labels, source = load_mnist("test", quiet=True)
    i = int(np.flatnonzero(labels == args.digit)[0])
    x0 = to_model_range(images[i:i + 1])                              # [1, 1, 28, 28] in [-1, 1]
    sched = Schedule()
    rng = np.random.default_rng(0)
    t = np.array([args.t])
    xt = sched.q_sample(x0, t, rng.standard_normal(x0.shape).astype(np.float32))

    cfg = get_config(args.preset)
    model = UViT(cfg).to(Backend("cpu", "float32"))
    print(f"U-ViT '{args.preset}': {model.num_params():,} parameters; patch {cfg.patch_size}, "
          f"dim {cfg.dim}, {cfg.num_blocks} blocks, {cfg.num_heads} heads")
    print(f"a real digit {args.digit} from {source}, noised to t = {args.t} "
          f"(sqrt(abar_t) = {np.sqrt(sched.alphas_cumprod[args.t]):.3f})\n")
    print(f"{'stage':48s} {'shape':18s} {'mean':>8s} {'std':>8s}")

    def show(name, a):
        print(f"{name:48s} {str(list(a.shape)):18s} {float(a.mean()):8.3f} {float(a.std()):8.3f}")

    eps = model.forward(xt, t, np.array([args.digit]), trace=show)
    print(f"\nthe untrained network's noise prediction has shape {list(eps.shape)}: "
          "training teaches it to match the noise that was added.")


if __name__ == "__main__":
    main()
