import os

from setuptools import find_packages, setup


def _pins(name):
    """Exact pins from a requirements file next to this one (what the test suite ran with), with
    their environment markers (a pin per Python where the two stacks differ)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


setup(
    name="megatron-attnedit",
    version="0.1.0",
    description="Convert trained LLMs (Qwen3, Qwen3-MoE, Llama 3) to MLA / GateSWA attention by progressive distillation on megatron-core",
    packages=find_packages(include=["megatron_attnedit", "megatron_attnedit.*"]),
    # The bundled teachers ship inside the package; recipes and launchers stay in launch/ (the
    # project is used from a checkout, installed in editable mode by launch/install.sh).
    package_data={"megatron_attnedit": ["assets/teachers/*/*", "targets/gate_swa/hf/*.py"]},
    # one command with subcommands (megatron_attnedit/cli/main.py); the scripts stay as shims
    entry_points={"console_scripts": ["attnedit=megatron_attnedit.cli.main:main"]},
    # 3.11: the fallback stack (megatron-core 0.16.1); >= 3.12: the primary one (0.19.2). transformers
    # 5.25 and numpy 2.4 require 3.11.
    python_requires=">=3.11",
    # Exact pins (requirements.txt). torch is deliberately not among them: the install script
    # installs torch==2.13.0 only when no torch is present, and never replaces the user's own build.
    install_requires=_pins("requirements.txt"),
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # torch_npu must match the installed torch; MindSpeed is installed from its repository
        # (see README, "Ascend").
        "npu": ["torch_npu"],
        "report": [p for p in _pins("requirements-test.txt") if p.startswith("matplotlib")],
        "test": _pins("requirements-test.txt"),
    },
)
