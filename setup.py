"""Install vatt_fast and the top-level kernels/ folder as vatt_fast.kernels."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "vatt_fast" / "__init__.py").read_text(), version)

setup(
    name="vatt_fast",
    version=version["__version__"],
    description="Fast, usable VATT (video-audio-text Transformers) in PyTorch with Triton kernels",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["vatt_fast", "vatt_fast.*"]) + ["vatt_fast.kernels"],
    # The kernels live in a top-level folder but install as vatt_fast.kernels, so no
    # top-level `kernels` module (a name taken on PyPI) is ever installed.
    package_dir={"vatt_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tensorboard>=2.12",
        "tokenizers>=0.15",
        "av>=12.0",
        "matplotlib>=3.7",
        "soundfile>=0.12",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=1.40"],
        "video": ["av>=12.0"],
        "dev": [
            "pytest>=7.4",
            "pytest-benchmark>=4.0",
            "pytest-timeout>=2.2",
            "ruff>=0.6",
            "nvidia-dali-cuda130>=1.40; platform_system == 'Linux'",
        ],
    },
    entry_points={
        "console_scripts": [
            "vatt-train=vatt_fast.train:cli",
            "vatt-eval=vatt_fast.eval:cli",
            "vatt-finetune=vatt_fast.finetune:cli",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
