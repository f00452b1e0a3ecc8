"""megatron-attnedit: convert trained Qwen3 models to MLA / GateSWA attention by progressive distillation."""

import warnings as _warnings

# megatron-core announces every fallback it takes without transformer-engine / apex, once per
# module; on the local spec that is the expected configuration, not news for the user.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
_warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")

__version__ = "0.1.0"
