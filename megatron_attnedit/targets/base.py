"""What an attention target is: the interface every target implements, and shared helpers.

A target owns its whole lifecycle in its folder (``targets/<name>/``):

  __init__.py   the target class: typed options resolved once against the teacher's config
                (``resolve`` -> a frozen ``Options`` dataclass, derived values included), the layer
                kinds, the KV-cache formula, the FLOP count, a one-line description, how to
                recognise its own HF export (``recognise``); no megatron-core here, so the decode
                engine and the benchmarks import it where megatron-core is not installed
  model.py      megatron-core: the layer spec, the TransformerConfig fields it needs, the checkpoint
                mapping rules of its parameters, the initializer from the teacher's layer, the
                parameters stage 1 trains, the layout rules it adds, the checks a run needs
  export.py     the HF export (config, weight transform, shipped code)
  decode.py     the cached decode of its export (the decode engine's attention kind)

``AttentionTarget`` forwards the megatron capabilities to ``model.py``, imported on first use
(megatron-core is a heavy optional dependency there). ``CAPABILITIES`` lists every capability;
``tests/test_target_registry.py`` walks the registry and fails when a target lacks one.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families import head_dim

# (capability, where it lives) -- what a target must provide
CAPABILITIES: Tuple[Tuple[str, str], ...] = (
    ("resolve", "__init__"), ("layer_kinds", "__init__"), ("kv_bytes_per_layer", "__init__"), ("flops", "__init__"),
    ("describe", "__init__"), ("recognise", "__init__"), ("attention_window", "__init__"),
    ("config_overrides", "model"), ("attention_spec", "model"), ("attention_rules", "model"), ("init_from_teacher", "model"),
    ("trainable_attention_params", "model"), ("validate_layout", "model"), ("run_warnings", "__init__"),
    ("hf_export", "export"), ("decode_class", "decode"),
)


@dataclasses.dataclass(frozen=True)
class HFExport:
    """Everything ``mcore_to_hf`` needs for a student that differs from the teacher's export."""

    target: object  # config.TargetConfig
    table: object  # families.table.ModelTable of the student
    hf_config: dict  # config.json
    code_files: Tuple[str, ...] = ()  # source files copied next to the weights
    zero_tensors: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()  # HF tensors written as zeros
    transform: object = None  # (HF name, tensor) -> tensor, per HF tensor; None: unchanged
    notes: Tuple[str, ...] = ()  # printed to stderr, one line each


def gqa_layer_bytes(cfg: dict, bytes_per_elem: int = 2) -> int:
    """One GQA layer, one token: K and V of every KV head (2 x kv_heads x head_dim x bytes)."""
    return 2 * int(cfg["num_key_value_heads"]) * head_dim(cfg) * bytes_per_elem


def teacher_kv_bytes_per_token(hf_cfg: dict, bytes_per_elem: int = 2) -> int:
    """Whole teacher model (all layers), independent of context length."""
    return int(hf_cfg["num_hidden_layers"]) * gqa_layer_bytes(hf_cfg, bytes_per_elem)


def mean_keys(seq: int, window: Optional[int] = None) -> float:
    """Keys a query attends to, averaged over the sequence (causal; at most ``window``)."""
    if window is None or window >= seq:
        return (seq + 1) / 2
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


@dataclasses.dataclass
class LayerFlops:
    """Forward FLOPs per token of one attention layer of a student: ``proj`` (its linears), ``score``
    (QK^T and PV), ``input`` (the linears reading the layer input: the input-gradient GEMM that
    stage 1 skips), and whether stage 1 trains it."""

    proj: float
    score: float
    input: float
    trained: bool


def gqa_layer_flops(hf_cfg: dict, seq: int, window: Optional[int] = None, extra_proj: float = 0.0) -> LayerFlops:
    """The teacher's attention layer (``window``: a sliding one), plus ``extra_proj`` linear FLOPs."""
    h, nh, nkv, d = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"], head_dim(hf_cfg)
    return LayerFlops(proj=2 * (h * (nh + 2 * nkv) * d + nh * d * h) + extra_proj, score=4 * mean_keys(seq, window) * nh * d,
                      input=2 * h * (nh + 2 * nkv) * d + extra_proj, trained=True)


class AttentionTarget:
    """Base class; see the module docstring. Subclasses set ``name``, ``title``, ``Options`` (a
    frozen dataclass: every option with its default; options not listed there are rejected by
    name) and ``KINDS`` (layer kind letter -> meaning), and implement the capabilities."""

    name: str = ""
    title: str = ""  # how the user reads it: "MLA", "GateSWA"
    Options: type = None
    KINDS: Dict[str, str] = {}
    weight_markers: Tuple[str, ...] = ()  # megatron parameter names only this target's students have

    # -- options ---------------------------------------------------------------------------------
    def defaults(self) -> Dict[str, object]:
        """Every option with its default (derived fields, filled by ``resolve``, are not options)."""
        return {f.name: f.default for f in dataclasses.fields(self.Options) if not f.metadata.get("derived")}

    def check_keys(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.defaults()))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for target {self.name}; known: {', '.join(self.defaults())}"
            )

    def resolve(self, hf_cfg: dict, options: dict):
        """The options, defaults filled in and derived values resolved, checked against the teacher."""
        self.check_keys(options)
        return self.Options(**options)

    def validate(self, hf_cfg: dict, options: dict) -> None:
        self.resolve(hf_cfg, options)

    def calibration_tokens(self, hf_cfg: dict, options: dict) -> int:
        """Training tokens whose teacher activations ``init_from_teacher`` wants (0: none)."""
        return 0

    def layer_kinds(self, hf_cfg: dict, options: dict) -> List[str]:
        """One kind letter per layer (``KINDS``)."""
        raise NotImplementedError

    def kv_bytes_per_layer(self, hf_cfg: dict, options: dict, context: int, bytes_per_elem: int = 2) -> List[float]:
        """KV-cache bytes per token of each layer at a context of ``context`` tokens: a cache holding
        ``context`` positions holds ``context`` x these bytes in each layer (what the decode engine's
        allocated tensors are checked against)."""
        raise NotImplementedError

    def kv_bytes_per_token(self, hf_cfg: dict, options: dict, context: int, bytes_per_elem: int = 2) -> float:
        """The whole model's KV-cache bytes per token: the layers' sum."""
        return float(sum(self.kv_bytes_per_layer(hf_cfg, options, context, bytes_per_elem)))

    def flops(self, hf_cfg: dict, options: dict, seq: int) -> List[LayerFlops]:
        """Forward FLOPs per token of each layer's attention (launch/bench.py's count)."""
        raise NotImplementedError

    def describe(self, hf_cfg: Optional[dict], options: dict) -> str:
        """One line for logs and reports."""
        raise NotImplementedError

    def recognise(self, cfg: dict) -> Optional[dict]:
        """This target's options read off an HF config that has no ``attnedit`` record (exports
        written before it existed, or stock models of the export's class); None: not this target's."""
        return None

    def options_record(self, hf_cfg: dict, options: dict) -> dict:
        """Every option, defaults filled in: what an export records of its target (derived values left out)."""
        o = self.resolve(hf_cfg, options)
        out = {k: getattr(o, k) for k in self.defaults()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def recorded_options(self, options: dict) -> dict:
        """Options of an export's ``attnedit`` record as the decode engine and the KV formula take them."""
        return dict(options)

    def attention_window(self, options: dict) -> Optional[int]:
        """Keys a query sees at most in some layer (a sliding window), None if every layer sees all:
        the evaluation measures the loss beyond it."""
        return None

    def run_warnings(self, hf_cfg: dict, options: dict, seq_length: int) -> List[str]:
        """Lines to print once before training at ``seq_length`` (nothing wrong, but worth knowing)."""
        return []

    # -- where the rest lives ----------------------------------------------------------------------
    def _part(self, part: str):
        # model.py imports megatron-core, export.py transformers: loaded when first used, so that
        # the options, the formulas and the decode import without them
        return importlib.import_module(f"{type(self).__module__}.{part}")

    def config_overrides(self, hf_cfg, options):
        return self._part("model").config_overrides(self, hf_cfg, options)

    def attention_spec(self, layer, hf_cfg, options, build_opts):
        return self._part("model").attention_spec(self, layer, hf_cfg, options, build_opts)

    def attention_rules(self, layer, hf_cfg, options):
        return self._part("model").attention_rules(self, layer, hf_cfg, options)

    def init_from_teacher(self, student_attn, teacher_attn, layer, hf_cfg, options, **extra):
        return self._part("model").init_from_teacher(self, student_attn, teacher_attn, layer, hf_cfg, options, **extra)

    def trainable_attention_params(self, layer_module):
        return self._part("model").trainable_attention_params(self, layer_module)

    def validate_layout(self, hf_cfg, options, build_opts) -> None:
        """Divisibility rules of the parallel layout that this target adds."""
        return self._part("model").validate_layout(self, hf_cfg, options, build_opts)

    def hf_export(self, hf_cfg, target, table, where) -> HFExport:
        return self._part("export").hf_export(self, hf_cfg, target, table, where)

    def decode_class(self):
        return self._part("decode").ATTENTION


def expand_pattern(pattern: Union[str, Sequence[str]], num_layers: int, kinds: Dict[str, str], option: str = "pattern") -> List[str]:
    """A per-layer list of kind letters from a string tiled over the layers ("SSSSSF") or an
    explicit list of one letter per layer. ``kinds`` maps each allowed letter to its meaning."""
    allowed = ", ".join(f"{k} ({v})" for k, v in kinds.items())
    if isinstance(pattern, str):
        letters = list(pattern.strip())
        if not letters:
            raise ConfigError(f"{option} is empty; use letters {allowed}")
        per_layer = [letters[i % len(letters)] for i in range(num_layers)]
    elif isinstance(pattern, (list, tuple)):
        per_layer = [str(x) for x in pattern]
        if len(per_layer) != num_layers:
            raise ConfigError(f"{option} lists {len(per_layer)} layers but the model has {num_layers}; give one entry per layer or a string to tile")
        letters = per_layer
    else:
        raise ConfigError(f"{option} must be a string like 'SSSSSF' or a list of one letter per layer, got {pattern!r}")
    bad = sorted({x for x in letters if x not in kinds})
    if bad:
        raise ConfigError(f"{option} {pattern!r} names unknown layer kind(s) {', '.join(map(repr, bad))}; use {allowed}")
    return per_layer


def check_int(options, key: str, low: int = 1, high: Optional[int] = None, why: str = "") -> int:
    """``options.<key>`` is an integer in [low, high] (one line saying so if not)."""
    v = getattr(options, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}={v} is out of range; it must be {rng}{why}")
    return v
