"""tinyuvit: U-ViT (Bao et al., CVPR 2023) from scratch in NumPy, with hand-written gradients.

    import tinyuvit
    run = tinyuvit.load("runs/mnist-tiny/checkpoint.npz")
    images = run.sample(digits=[3, 7], count=8)      # uint8 [16, 28, 28]
"""
__version__ = "0.1.0"

from .api import Run, load  # noqa: E402,F401
from .diffusion import Diffusion  # noqa: E402,F401
from .sampling import SampleConfig  # noqa: E402,F401
from .errors import TinyUViTError  # noqa: E402,F401
from .model import PRESETS, UViT, UViTConfig, get_config  # noqa: E402,F401
from .config import TrainConfig  # noqa: E402,F401  (the loop: tinyuvit.train.train)
