"""Train a small Vision Transformer on MNIST with tinyuvit's hand-written backward, then test it.

    python examples/vit_mnist.py --steps 500                  # ~1 minute on a CPU core: ~92%
    python examples/vit_mnist.py --epochs 18 --data-dir DIR   # the shipped classifier: 99.33%, ~15 min

(OPENBLAS_NUM_THREADS=1 is as fast as more threads for these small matrices, and much faster
when other programs share the cores.)

Every piece is in tinyuvit/tools/vit.py: the model (patches -> class token -> transformer blocks ->
LayerNorm -> linear head), the softmax cross-entropy, AdamW with warmup and cosine decay, and
random shifts of a pixel or two as augmentation.
"""
import argparse
import time

from tinyuvit.backend import Backend
from tinyuvit.tools.data import load_mnist
from tinyuvit.tools.images import to_model_range
from tinyuvit.tools.vit import ViT, ViTConfig, accuracy, fit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    ap.add_argument("--epochs", type=float, default=None, help="passes over the data (overrides --steps)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--shift", type=int, default=1, help="random shifts of up to this many pixels")
    ap.add_argument("--patch-size", type=int, default=7, help="7: 16 tokens; 4: 49 tokens, ~3x slower")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--data-dir", default=None, help="folder with the four MNIST files")
    ap.add_argument("--save", default=None, help="write the trained model to this .npz")
    args = ap.parse_args()

    # Data: uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1]
    train_u8, train_y, source = load_mnist("train", data_dir=args.data_dir)
    test_u8, test_y, _ = load_mnist("test", data_dir=args.data_dir)
    train_x, test_x = to_model_range(train_u8), to_model_range(test_u8)
    print(f"data: {source}, {len(train_x)} train / {len(test_x)} test digits")

    cfg = ViTConfig(patch_size=args.patch_size, dim=args.dim, depth=args.depth, num_heads=args.heads)
    model = ViT(cfg, seed=args.seed).to(Backend(args.device, "float32"))
    steps = args.steps if args.epochs is None else int(round(args.epochs * len(train_x) / args.batch_size))
    print(f"model: {cfg}, {model.num_params():,} parameters; {steps} steps of {args.batch_size}")

    t0 = time.perf_counter()
    loss, acc, rate = fit(model, train_x, train_y, steps, args.batch_size, args.lr,
                          max_shift=args.shift, seed=args.seed)
    print(f"trained in {time.perf_counter() - t0:.0f} s ({rate:.0f} img/s): "
          f"running loss {loss:.4f}, running train accuracy {acc:.4f}")

    test_acc = accuracy(model, test_x, test_y)
    print(f"test accuracy: {test_acc:.4f} ({int(round((1 - test_acc) * len(test_y)))} of {len(test_y)} wrong)")
    if args.save:
        model.save(args.save, meta={"test_accuracy": test_acc, "steps": steps})
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
