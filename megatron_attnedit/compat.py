"""The megatron-core versions this project runs on, and how they differ where that is not a patch.

Supported: megatron-core 0.19.x on Python >= 3.12 (the primary stack; CI runs the whole suite on
0.19.2) and 0.16.1 on Python 3.11 (the fallback, for machines without Python 3.12: every release since
0.17 requires it; CI runs a smoke subset). Two places read the installed version: ``fixes.py`` applies
each fix inside the version range it names, through ``mcore_in``; ``HYBRID_MODEL`` below picks the
model class. Nothing else branches on it.

* 0.19 deprecates ``GPTModel`` for ``HybridModel`` (a layer pattern, one symbol per attention or MLP
  layer): ``HYBRID_MODEL`` is true there, and ``models/builder.build_model`` builds a HybridModel
  (``models/hybrid.py``) with GPTModel's computation and checkpoint keys; before 0.19 a GPTModel.
  Code that walks layers or names parameters goes through ``models/layers.py`` (``local_layers``,
  ``gpt_layout_name``), which reads either.

What differs between the two without being a change to megatron-core:

* 0.17+ passes ``name=`` and ``pp_layer_offset=`` to attention modules: our attention subclasses
  take ``**kwargs`` and hand them on (no version test needed).
* 0.17+ checks an MLA layer's Q / KV norms against ``qk_layernorm`` in a resolver
  (``mla_qk_norm_config.QKNormConfigResolver``) that has no local-spec layout for DeepSeek's own
  norms: full-rank queries with the latent KV norm are refused (with a q_layernorm in the spec:
  "non-trivial, but q_lora_rank is None"; without one and qk_layernorm on, it asks for
  transformer-engine's fused norm+linear; with qk_layernorm off, it refuses kv_layernorm).
  ``DeepSeekNorms`` builds the norms as the spec names them, as 0.16 did: the KV latent norm
  always, the Q latent norm only with ``q_lora_rank`` (tests/test_fixes.py checks that megatron's
  resolver still refuses the layout, so this goes when megatron accepts it).
* 0.17+ describes an MLP / MoE by a ``functools.partial`` over the module (an "MlpBuilder") where
  0.16 had a ``ModuleSpec``; ``mlp_submodules`` reaches the submodules of either.
* 0.17+ calls the MLA flag of ``rope_utils._apply_rotary_pos_emb_bshd`` ``mla_rotary_interleaved``
  (0.16: ``multi_latent_attention``): ``kernels/fusions.rope_dispatch`` takes either.
* 0.17+'s linear autograd function has one more input (``gtp_remat_size``):
  ``kernels/wgrad.weight_grads_only`` returns one gradient per input, however many.
* 0.17+ saves the non-tensor state of a torch_dist checkpoint as a ``common_state`` object inside
  the checkpoint instead of ``common.pt``; both versions load ``common.pt``, so the converter keeps
  writing it, and ``convert/checkpoint.py`` reads either.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Optional, Tuple

Version = Tuple[int, int, int]


def _parse(text: str) -> Version:
    nums = [int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def megatron_core_version() -> Version:
    """The installed megatron-core, e.g. (0, 19, 2); (0, 0, 0) when none is installed."""
    try:
        return _parse(version("megatron-core"))
    except PackageNotFoundError:
        return (0, 0, 0)


MCORE: Version = megatron_core_version()


def mcore_in(since: Optional[str], before: Optional[str], v: Version = MCORE) -> bool:
    """``since <= v < before`` (either bound may be None: open)."""
    return (since is None or v >= _parse(since)) and (before is None or v < _parse(before))


HYBRID_MODEL: bool = mcore_in("0.19.0", None)  # build HybridModel (GPTModel is deprecated from 0.19)


class DeepSeekNorms:
    """Mixin for ``MLASelfAttention`` subclasses: the norms and projections exactly as the layer
    spec names them (megatron-core >= 0.17 asks ``_resolve_qk_norm_config``; 0.16 never calls it)."""

    def _resolve_qk_norm_config(self, submodules):
        from megatron.core.transformer.identity_op import IdentityOp

        return dict(
            linear_q_proj=submodules.linear_q_proj,
            linear_q_up_proj=submodules.linear_q_up_proj,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            # built only when q_lora_rank is set (megatron's __init__ checks that itself)
            q_layernorm=submodules.q_layernorm or IdentityOp,
            kv_layernorm=submodules.kv_layernorm or IdentityOp,
        )


def mlp_submodules(spec):
    """The submodules (``MLPSubmodules`` / ``MoESubmodules``) of an MLP or MoE spec of megatron's
    ``get_mlp_module_spec_for_backend``: a ModuleSpec in 0.16, a functools.partial from 0.17 on."""
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules
