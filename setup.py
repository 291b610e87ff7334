from setuptools import find_packages, setup

setup(
    name="tinyuvit",
    version="0.1.0",
    description="U-ViT, a diffusion transformer, from scratch in NumPy with hand-written gradients",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tinyuvit", "tinyuvit.*"]),
    package_data={"tinyuvit": ["assets/*.npz"]},
    install_requires=["numpy>=2", "scipy", "click>=8", "pillow", "matplotlib",
                      "threadpoolctl"],  # --threads: BLAS threads at run time
    extras_require={
        "test": ["pytest", "autograd>=1.7"],
        "gpu": ["cupy-cuda12x"],
    },
    entry_points={"console_scripts": ["tinyuvit=tinyuvit.tools.cli:main"]},
)
