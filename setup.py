from setuptools import find_packages, setup

setup(
    name="megatron-attnedit",
    version="0.1.0",
    description="Convert trained Qwen3 LLMs to MLA / GateSWA attention by progressive distillation on megatron-core",
    packages=find_packages(include=["megatron_attnedit", "megatron_attnedit.*"]),
    # The bundled teachers ship inside the package; recipes and launchers stay in launch/ (the
    # project is used from a checkout, installed in editable mode by launch/install.sh).
    package_data={"megatron_attnedit": ["assets/teachers/*/*", "convert/hf_gateswa/*.py"]},
    python_requires=">=3.10",
    # torch is deliberately not pinned here: the install script installs torch==2.13.0 only when
    # no torch is present, and never replaces the user's own build (CUDA, ROCm, torch_npu).
    install_requires=[
        "megatron-core==0.16.1",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "wandb>=0.18",
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",
        "numpy",
        "einops",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # torch_npu must match the installed torch; MindSpeed is installed from its repository
        # (see README, "Ascend").
        "npu": ["torch_npu"],
        "report": ["matplotlib>=3.7"],
        "test": ["pytest>=7", "matplotlib>=3.7"],
    },
)
