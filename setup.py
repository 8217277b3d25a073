"""megamoe: Mixture-of-Experts training for large models (DeepSpeed/Megatron-style plugin)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")
# The version lives in megamoe/__init__.py (what `megamoe --version` prints); read, not imported.
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("megamoe").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="megamoe",
    version=VERSION,
    description="Mixture-of-Experts layers, routers and distributed training for large models",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    # torch is deliberately unpinned: an existing (CUDA) install is kept. tools/bootstrap.sh
    # installs a CPU build first on machines without a GPU.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=5.0",  # v5 stacked-expert MoE classes (gate_up_proj), rope_parameters
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "scipy>=1.11",
        "tensorboard>=2.15",
        "numpy>=1.26",
        "accelerate>=1.0",  # transformers.Trainer needs it (HF Trainer integration and its tests)
        "gymnasium>=1.0",
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        # MuJoCo tasks for `megamoe rl` (HalfCheetah-v5, ...); Pendulum-v1 needs nothing extra.
        "mujoco": ["gymnasium[mujoco]>=1.0"],  # mujoco + imageio
        # The GPU kernels (megamoe.kernels, ExpertConfig.impl="triton"); CUDA builds of torch
        # already bring triton. On CPU it only runs the kernels' tests under its interpreter.
        "triton": ["triton>=3.0"],
        # NVIDIA apex is not on PyPI; build it from source to enable fused optimizers/norms.
        # megamoe imports it when present and falls back to torch's fused paths otherwise.
    },
    entry_points={"console_scripts": ["megamoe=megamoe.cli:main"]},
)
