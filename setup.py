"""slora-plugin: serve thousands of LoRA adapters from vLLM's own KV pages.

`kernels/` and `patches/` are top-level folders of the repository but are installed as
`slora_plugin.kernels` and `slora_plugin.patches`: the bare names belong to other PyPI
packages, so they must never be importable as top-level modules from this distribution.
"""

from setuptools import setup

VERSION = "0.1.0.dev0"

setup(
    name="slora-plugin",
    version=VERSION,
    description="Unified KV/adapter paging and paged LoRA kernels for vLLM (S-LoRA / Punica design)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "slora_plugin",
        "slora_plugin.adapters",
        "slora_plugin.bench",
        "slora_plugin.compress",
        "slora_plugin.pool",
        "slora_plugin.worker",
        "slora_plugin.train",
        "slora_plugin.kernels",
        "slora_plugin.patches",
    ],
    package_dir={
        "slora_plugin": "slora_plugin",
        "slora_plugin.kernels": "kernels",
        "slora_plugin.patches": "patches",
    },
    install_requires=[
        "vllm==0.26.0",
        "torch==2.11.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # matplotlib: the report tests draw the benchmark plots; wheel: the no-shadowing test
        # builds the wheel without build isolation (offline); ruff: the lint CI runs (pyproject.toml)
        "test": ["pytest>=7", "hypothesis>=6.100", "peft>=0.13", "matplotlib>=3.7", "wheel>=0.40",
                 "ruff>=0.6,<1"],
        "bench": ["tqdm>=4.60", "matplotlib>=3.7", "numpy>=1.24"],
    },
    entry_points={
        "vllm.general_plugins": ["slora = slora_plugin:register"],
        "console_scripts": ["slora-plugin = slora_plugin.cli:main"],
    },
)
