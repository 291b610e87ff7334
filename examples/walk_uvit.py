"""Walk one real MNIST digit through U-ViT and print the shape of the data at every stage.

    python examples/walk_uvit.py [--preset tiny] [--t 500] [--digit 7]

The walk calls the model's own modules one by one, in the order of UViT.forward (the paper's
Figure 1 read from bottom: patches, time, label, to top: the prediction), and at the end checks
that its result is exactly what `model.forward` returns, so what it prints is the real code path.
"""
import argparse

import numpy as np

from tinyuvit.backend import Backend
from tinyuvit.tools.data import load_mnist
from tinyuvit.tools.images import to_model_range
from tinyuvit.diffusion import Schedule
from tinyuvit.layers import timestep_embedding, unpatchify
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
        return a

    m, y = model, np.array([args.digit])
    show("input x_t", xt)                                                      # [1, C, H, W]
    patches = show("patch_embed", m.patch_embed(xt, train=False))              # [1, N, D]
    time = show("time token (timestep_embedding)", timestep_embedding(t, cfg.dim, m.dtype)[:, None, :])
    label = show("label token (label_embed)", m.label_embed(y, train=False)[:, None, :])
    h = show("concat [label, time, patches]", np.concatenate([label, time, patches], axis=1))
    h = show("+ pos_embed", m.pos_embed(h, train=False))                      # [1, 2+N, D]
    skips = []
    for i, blk in enumerate(m.in_blocks):
        h = show(f"in_blocks[{i}] (pushed as skip {i})", blk(h, train=False))
        skips.append(h)
    h = show("mid_block", m.mid_block(h, train=False))
    for i, blk in enumerate(m.out_blocks):
        h = blk(h, skips.pop(), train=False)
        show(f"out_blocks[{i}] (long skip from in_blocks[{len(skips)}])", h)
    h = show("norm, decoder_pred", m.decoder_pred(m.norm(h, train=False), train=False))
    h = show("drop label and time tokens", h[:, m.extras:])                    # [1, N, p*p*C]
    img = show("unpatchify", unpatchify(h, cfg.patch_size, cfg.in_chans))      # [1, C, H, W]
    out = show("final_layer (3x3 conv) = the prediction", m.final_layer(img, train=False))

    assert np.array_equal(out, model.forward(xt, t, y, train=False)), "the walk left UViT.forward's path"
    print(f"\nthe walk's result is exactly model.forward(x_t, t, y). The untrained network's prediction "
          f"has shape {list(out.shape)}: training teaches it the v (or eps) of the noise that was added.")


if __name__ == "__main__":
    main()
