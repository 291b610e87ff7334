"""Build tinyuvit/assets/mnist_subset.npz: a class-balanced subset of real MNIST digits.

Run from the repository root:
    python -m tinyuvit.assets.make_mnist_subset --data-dir ../shared/data/mnist
The choice is deterministic (fixed seed), so rerunning it gives the same digits.
"""
import argparse
from pathlib import Path

import numpy as np

from tinyuvit.tools.data import SPLITS, SUBSET_PATH, _read_verified

SEED = 0
PER_CLASS = {"train": 1000, "test": 200}


def balanced_indices(labels, per_class, rng):
    """Sorted indices of `per_class` random examples of each digit 0-9."""
    picks = [rng.choice(np.flatnonzero(labels == digit), per_class, replace=False)
             for digit in range(10)]
    return np.sort(np.concatenate(picks))


def build_subset(data_dir, seed=SEED):
    """A dict of arrays {split}_images, {split}_labels, {split}_index for both splits."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, (image_name, label_name, _) in SPLITS.items():
        images = _read_verified(data_dir, image_name)
        labels = _read_verified(data_dir, label_name)
        index = balanced_indices(labels, PER_CLASS[split], rng)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index].astype(np.uint8)
        arrays[f"{split}_index"] = index.astype(np.int32)  # positions in the full files
    return arrays


def main(argv=None):
    """Parse arguments, build the subset and write it with np.savez_compressed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST IDX files")
    parser.add_argument("--out", default=str(SUBSET_PATH), help="output .npz (default: the asset)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    arrays = build_subset(Path(args.data_dir), args.seed)
    np.savez_compressed(args.out, **arrays)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(arrays['train_labels'])} train / "
          f"{len(arrays['test_labels'])} test digits, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
