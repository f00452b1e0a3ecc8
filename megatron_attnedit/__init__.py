"""megatron-attnedit: convert trained Qwen3 models to MLA / GateSWA attention by progressive distillation."""

import logging as _logging
import warnings as _warnings

# megatron-core announces every fallback it takes without transformer-engine / apex, once per
# module; on the local spec that is the expected configuration, not news for the user.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
_warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")


class _NoGpuNotice(_logging.Filter):
    """PyPI's torch on Python >= 3.12 is a CUDA build; on a machine with a CUDA toolkit but no GPU
    (CPU training, CI, conversion on a login node) its ``torch.utils.cpp_extension``, which
    megatron-core imports, logs "No CUDA runtime is found, using CUDA_HOME=..." at import time --
    before any command has run, so a command's one-line error would come second on stderr. Only
    that message is dropped (the platform is chosen and reported by ``platform.py``); the logger's
    other messages stay. Installed here, at the package import, because the message is logged
    while megatron-core is imported, before ``fixes.apply`` could run."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


_logging.getLogger("torch.utils.cpp_extension").addFilter(_NoGpuNotice())

__version__ = "0.1.0"
