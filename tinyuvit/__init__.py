"""tinyuvit: U-ViT (Bao et al., CVPR 2023) from scratch in NumPy, with hand-written gradients."""
__version__ = "0.1.0"
