"""Run configuration: one typed dataclass per concern, one container over them, filled from YAML.

A run is a recipe (``launch/recipes/*.yaml``) plus a few ``--set section.key=value`` overrides.
Recipes may name a ``base:`` recipe to start from and carry per-stage overlays under ``stages:``
(``stages: {stage1: {...}, stage2: {...}}``); ``--stage NAME`` applies one overlay and selects the
objective of that name. Unknown keys are rejected by name with the closest valid key suggested.
Field names follow Megatron-LM's flags where one exists (``--tensor-model-parallel-size`` ->
``parallel.tensor_model_parallel_size``). This module imports no torch, so bad input fails fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional

import yaml

from megatron_attnedit.errors import ConfigError

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "recipes")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(value, allowed, key: str) -> None:
    _check(value in allowed, f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "mla_up_proj")
"""megatron's selective-recompute modules that the local spec and this project's modules support."""


@dataclasses.dataclass
class ModelConfig:
    hf_dir: Optional[str] = None
    """Hugging Face model directory: its config.json defines the architecture and its weights
    initialise the model (unless random_init). For distillation, this is the teacher."""
    preset: Optional[str] = None
    """Instead of hf_dir: a name from families.PRESETS (e.g. qwen3-debug), randomly initialised."""
    random_init: bool = False
    """With hf_dir: take only the architecture, start from random weights (pretraining from scratch)."""
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """HF config.json fields to override, e.g. {num_hidden_layers: 6} for a benchmark slice."""
    transformer_impl: str = "local"
    """local (megatron-core local spec + our flash attention) or transformer_engine."""
    moe_token_dispatcher_type: str = "allgather"
    """allgather (works everywhere) or alltoall (GPU/NPU, faster at large EP)."""
    moe_grouped_gemm: bool = False
    """Grouped-GEMM experts (torch._grouped_mm on GPU); SequentialMLP otherwise."""
    gradient_accumulation_fusion: Optional[bool] = None
    """Linear layers add their weight gradients into the fp32 main-grad buffers inside the GEMM
    (kernels/wgrad.py) instead of a bf16 GEMM plus an add. None: on for CUDA with the local spec."""
    kernel_fusion: Optional[bool] = None
    """Fused elementwise kernels (torch.compile) for RoPE, MLA's query/key assembly and SwiGLU --
    megatron's bias_activation_fusion for the dense MLP, kernels/fusions.py for the rest.
    None: on for CUDA with the local spec."""
    init_on_cpu: bool = True
    """Initialise weights on the CPU from one seed: the same weights at any TP/EP layout. False:
    on the accelerator with megatron's model-parallel RNG -- minutes faster at 30B (for random-
    weight runs and benchmarks; weights loaded from hf_dir replace either)."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation (Megatron-LM's --recompute-granularity): None, full (whole layers,
    see recompute_method) or selective (the modules in recompute_modules)."""
    recompute_modules: Optional[List[str]] = None
    """With selective: any of core_attn (the default), layernorm, mlp, moe (the whole MoE layer),
    mla_up_proj (MLA students)."""
    recompute_method: Optional[str] = None
    """With full: uniform (every recompute_num_layers layers form one recomputed chunk) or block
    (the first recompute_num_layers layers of each pipeline stage are recomputed). Default uniform."""
    recompute_num_layers: Optional[int] = None
    """With full: see recompute_method. Default 1."""

    def __post_init__(self):
        _check((self.hf_dir is None) != (self.preset is None), "model: set exactly one of model.hf_dir or model.preset")
        _check(not (self.random_init and self.preset), "model.random_init only applies to model.hf_dir (presets are always random)")
        _one_of(self.transformer_impl, ("local", "transformer_engine"), "model.transformer_impl")
        _one_of(self.moe_token_dispatcher_type, ("allgather", "alltoall"), "model.moe_token_dispatcher_type")
        _one_of(self.recompute_granularity, (None, "full", "selective"), "model.recompute_granularity")
        if self.recompute_granularity == "full":
            self.recompute_method = self.recompute_method or "uniform"
            self.recompute_num_layers = self.recompute_num_layers or 1
            _one_of(self.recompute_method, ("uniform", "block"), "model.recompute_method")
            _check(self.recompute_num_layers >= 1, "model.recompute_num_layers must be >= 1")
        else:
            _check(self.recompute_method is None and self.recompute_num_layers is None,
                   "model.recompute_method / recompute_num_layers apply to model.recompute_granularity=full only")
        if self.recompute_modules is not None:
            _check(self.recompute_granularity == "selective", "model.recompute_modules applies to model.recompute_granularity=selective only")
            bad = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
            _check(not bad, f"model.recompute_modules: {', '.join(bad)} not supported here; choose from {', '.join(RECOMPUTE_MODULES)}"
                   + (" (moe_act is for megatron's GroupedMLP; use moe to recompute the whole MoE layer)" if "moe_act" in bad else ""))


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP: must divide the KV heads (TP splits whole query groups)."""
    pipeline_model_parallel_size: int = 1
    """PP: must divide the number of layers; the 1F1B schedule runs the micro-batches."""
    expert_model_parallel_size: int = 1
    """EP for MoE models; must divide the number of experts."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (only with TP > 1)."""
    overlap_grad_reduce: Optional[bool] = None
    """Reduce (reduce-scatter) each gradient bucket over the data-parallel ranks as soon as the last
    micro-batch's backward has filled it, overlapped with the rest of the backward (Megatron-LM's
    --overlap-grad-reduce). None: on for GPU/NPU with more than one data-parallel rank, off on CPU."""
    overlap_param_gather: Optional[bool] = None
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket during
    the next step's forward instead of right after the optimizer step (--overlap-param-gather).
    None: on whenever overlap_grad_reduce is on."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient bucket when overlapping (--ddp-bucket-size); None: megatron's
    default, max(40M, 1M x data-parallel size)."""

    def __post_init__(self):
        for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            _check(getattr(self, k) >= 1, f"parallel.{k} must be >= 1")
        _check(self.ddp_bucket_size is None or self.ddp_bucket_size > 0, "parallel.ddp_bucket_size must be > 0 (or null for megatron's default)")


@dataclasses.dataclass
class DataConfig:
    data_path: List[str] = dataclasses.field(default_factory=list)
    """Dataset prefixes written by checkpoints_tools/preprocess_data.py (PREFIX.bin / PREFIX.idx)."""
    data_weights: Optional[List[float]] = None
    """Blend weights, one per prefix (normalised); None = proportional to dataset size."""
    split: str = "99,1,0"
    """Train, validation, test proportions of every dataset (documents), megatron's --split."""
    valid_data_path: Optional[List[str]] = None
    """Separate validation prefixes (megatron's --valid-data-path, e.g. a file-level held-out set);
    when given, data_path is all training data and split is not used."""
    seq_length: int = 2048
    """Tokens per sample."""
    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (micro-batches accumulate)."""
    tokenizer_dir: Optional[str] = None
    """Tokenizer used to make the data (HF files or a SentencePiece .model); default model.hf_dir.
    Only its end-of-document id and vocabulary size are used in training."""
    eod_mask_loss: bool = False
    """Do not train on predicting the token after an end-of-document."""
    allow_longer_than_trained: bool = False
    """Allow seq_length beyond the model's max_position_embeddings (refused otherwise; a warning
    line is printed when allowed)."""

    def __post_init__(self):
        _check(len(self.data_path) > 0, "data.data_path is empty; give one or more prefixes made by checkpoints_tools/preprocess_data.py")
        if self.data_weights is not None:
            _check(len(self.data_weights) == len(self.data_path),
                   f"data.data_weights has {len(self.data_weights)} entries for {len(self.data_path)} prefixes in data.data_path")
            _check(all(w > 0 for w in self.data_weights), "data.data_weights must all be > 0")
        parts = self.split.replace("/", ",").split(",")
        _check(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts) and sum(map(float, parts)) > 0,
               f"data.split={self.split!r} must be three numbers like '99,1,0' (train, validation, test)")
        _check(self.seq_length > 0 and self.micro_batch_size > 0, "data.seq_length and data.micro_batch_size must be > 0")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"data.global_batch_size={self.global_batch_size} is not a multiple of data.micro_batch_size={self.micro_batch_size}")


@dataclasses.dataclass
class OptimConfig:
    optimizer: str = "adam"
    """adam (AdamW: decoupled weight decay) or sgd."""
    lr: float = 3.0e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 3.0e-5
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Linear warmup from 0 to lr over this many iterations."""
    lr_decay_style: str = "cosine"
    """cosine, WSD (warmup-stable-decay), linear or constant."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which lr decays to min_lr; default training.train_iters."""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD: length of the final decay phase; default 10% of lr_decay_iters."""
    lr_wsd_decay_style: str = "linear"
    """WSD decay phase shape: linear, cosine, exponential or minus_sqrt."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to biases and norms)."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron DistributedOptimizer)."""
    fused_adam: Optional[bool] = None
    """torch's fused AdamW kernel (one launch per parameter group) instead of its multi-tensor
    loop, where megatron falls back to torch's optimizer (no transformer-engine / apex). None: on
    for CUDA, off elsewhere. Same update to rounding (tests/test_training.py::test_fused_adam_resumes_an_unfused_run)."""

    def __post_init__(self):
        _one_of(self.optimizer, ("adam", "sgd"), "optimizer.optimizer")
        _one_of(self.lr_decay_style, ("cosine", "WSD", "linear", "constant"), "optimizer.lr_decay_style")
        _one_of(self.lr_wsd_decay_style, ("linear", "cosine", "exponential", "minus_sqrt"), "optimizer.lr_wsd_decay_style")
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"optimizer: need lr > 0 and 0 <= min_lr <= lr (lr={self.lr}, min_lr={self.min_lr})")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "optimizer.adam_beta1/adam_beta2 must be in [0, 1)")
        _check(self.weight_decay >= 0 and self.clip_grad >= 0 and self.lr_warmup_iters >= 0,
               "optimizer.weight_decay, clip_grad and lr_warmup_iters must be >= 0")


@dataclasses.dataclass
class TrainingConfig:
    train_iters: int = 1000
    """Optimizer steps in total (a resumed run continues up to this number)."""
    log_interval: int = 10
    """Print and log metrics (averaged over the interval) every this many steps."""
    eval_interval: int = 0
    """Evaluate on the validation split every this many steps (0 = never)."""
    eval_iters: int = 10
    """Global batches per evaluation."""
    seed: int = 1234
    """Seed for model init, data order and dropout; same seed + same data = same run."""
    bf16: Optional[bool] = None
    """bf16 parameters/activations with fp32 main weights; default on for GPU/NPU, off on CPU."""
    platform: str = "auto"
    """auto, cuda, npu or cpu."""
    run_dir: Optional[str] = None
    """Where everything of this run goes (config.yaml, checkpoints, metrics, W&B, data index cache);
    default runs/<recipe name>[/<stage>]."""
    profile_steps: Optional[List[int]] = None
    """[first, last] steps (1-based) to record with torch.profiler on rank 0: a Chrome trace and a
    table of the most expensive kernels go to <run_dir>/profile/ (as Megatron-LM's --profile)."""

    def __post_init__(self):
        _check(self.train_iters > 0 and self.log_interval > 0, "training.train_iters and training.log_interval must be > 0")
        _check(self.profile_steps is None or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]),
               "training.profile_steps must be [first, last] with 1 <= first <= last")
        _check(self.eval_interval >= 0 and self.eval_iters > 0, "training.eval_interval must be >= 0 and training.eval_iters > 0")
        _one_of(self.platform, ("auto", "cuda", "npu", "cpu"), "training.platform")


@dataclasses.dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Checkpoint directory (iter_XXXXXXX/ + latest_checkpointed_iteration.txt); default <run_dir>/checkpoints."""
    save_interval: int = 1000
    """Save every this many steps (0 = only at the end); the last step is always saved."""
    keep_last_n: int = 3
    """Keep only the newest N checkpoints (0 = keep all)."""
    load: Optional[str] = None
    """Resume from the latest checkpoint in this directory if it has one; default = save."""
    pretrained_checkpoint: Optional[str] = None
    """When not resuming: initialise the trained model's weights from this megatron checkpoint
    (e.g. stage 2 from stage 1's checkpoints); optimizer and data position start fresh."""

    def __post_init__(self):
        _check(self.save_interval >= 0 and self.keep_last_n >= 0, "checkpoint.save_interval and checkpoint.keep_last_n must be >= 0")


@dataclasses.dataclass
class MonitorConfig:
    wandb_project: str = "megatron-attnedit"
    """W&B project."""
    wandb_exp_name: Optional[str] = None
    """W&B run name; default <recipe name>[-<stage>]."""
    wandb_mode: Optional[str] = None
    """offline (default; sync later with `wandb sync`), online or disabled; default $WANDB_MODE or offline."""
    wandb_save_dir: Optional[str] = None
    """Where W&B writes its files; default the run directory."""

    def __post_init__(self):
        _one_of(self.wandb_mode, (None, "offline", "online", "disabled"), "monitor.wandb_mode")


@dataclasses.dataclass
class ObjectiveConfig:
    name: str = "lm"
    """What is trained: lm (next-token CE), stage1, stage2 (training/objective.py OBJECTIVES)."""
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """The objective's own options; it validates them."""


@dataclasses.dataclass
class TargetConfig:
    """The ``target:`` section of a recipe, and what every part of the project passes around as
    "the student's attention" (checkpoint metadata, exports). The target (``targets.get_target``)
    resolves and validates the options against the teacher's config."""

    name: Optional[str] = None
    """Attention target of the student (mla, gate_swa, gqa: targets/); None = teacher attention."""
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Passed through to the target; it validates them."""

    def __post_init__(self):
        _check(self.name is None or isinstance(self.name, str), f"target.name must be a target's name, got {self.name!r}")
        _check(isinstance(self.options, dict), f"target options must be a mapping, got {type(self.options).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> "TargetConfig":
        """{'name': ..., 'options': {...}} or the flat form {'name': ..., 'window': ..., ...}."""
        d = dict(d)
        _check("name" in d, "target section needs a 'name' (an attention target: mla, gate_swa, gqa)")
        name = d.pop("name")
        options = dict(d.pop("options", {}) or {})
        options.update(d)
        return cls(name=name, options=options)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}


@dataclasses.dataclass
class Config:
    model: ModelConfig = None  # type: ignore[assignment]  (always given: _build fills missing sections)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = None  # type: ignore[assignment]
    optimizer: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    name: str = "run"
    """Run name (the recipe's file name unless set); used for default directories."""

    def __post_init__(self):
        o, t = self.optimizer, self.training
        decay = o.lr_decay_iters or t.train_iters
        _check(o.lr_warmup_iters < decay, f"optimizer.lr_warmup_iters={o.lr_warmup_iters} must be below the decay length {decay}")
        if o.lr_wsd_decay_iters is not None:
            _check(0 < o.lr_wsd_decay_iters <= decay, f"optimizer.lr_wsd_decay_iters must be in (0, {decay}]")
        _check(not (self.parallel.overlap_param_gather and not o.use_distributed_optimizer),
               "parallel.overlap_param_gather needs optimizer.use_distributed_optimizer=true (only its sharded update leaves a gather to overlap)")
        if self.data.tokenizer_dir is None and self.model.hf_dir is None:
            raise ConfigError("data.tokenizer_dir is needed when the model comes from a preset (no model.hf_dir to take it from)")

    # Resolved paths ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return self.training.run_dir or os.path.join("runs", self.name)

    @property
    def save_dir(self) -> str:
        return self.checkpoint.save or os.path.join(self.run_dir, "checkpoints")

    @property
    def load_dir(self) -> str:
        return self.checkpoint.load or self.save_dir

    @property
    def tokenizer_dir(self) -> str:
        return self.data.tokenizer_dir or self.model.hf_dir  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------------------------
# Loading: YAML + overlays + --set overrides -> typed, validated Config
# ------------------------------------------------------------------------------------------------


def valid_keys(cls=Config, prefix: str = "") -> List[str]:
    """Every dotted key a recipe may set (free-form dicts end the walk)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, where: str, candidates: List[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid here: {', '.join(sorted(candidates))}"
    return ConfigError(f"unknown key '{key}' in {where}{hint}")


def _check_keys(cls, data: dict, where: str, prefix: str = "") -> None:
    """Reject keys that are not fields, naming the closest field at the same level."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} in {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if k not in hints:
            raise _unknown(prefix + str(k), where, [prefix + n for n in hints])
        if dataclasses.is_dataclass(hints[k]) and v is not None:
            _check_keys(hints[k], v, where, f"{prefix}{k}.")


def _coerce(value, tp, key: str):
    """YAML value -> the field's type (ints for floats, '3e-4' strings for floats, ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is Any:
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        _check(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return dict(value)
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
            return value
        if tp is int:
            _check(not isinstance(value, bool) and float(value) == int(float(value)), f"{key} must be an integer, got {value!r}")
            return int(float(value))
        if tp is float:
            _check(not isinstance(value, bool), f"{key} must be a number, got {value!r}")
            return float(value)
        if tp is str:
            _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key} must be a string, got {value!r}")
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {tp.__name__}, got {value!r}") from None
    return value


def _build(cls, data: dict, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} in {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    # Absent sections are built from their defaults, so a missing required field is reported by name.
    kw = {f.name: _build(hints[f.name], {}, where, f"{prefix}{f.name}.") for f in dataclasses.fields(cls)
          if f.name not in data and dataclasses.is_dataclass(hints[f.name])}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kw[k] = _build(tp, v or {}, where, f"{prefix}{k}.")
        else:
            kw[k] = _coerce(v, tp, prefix + k)
    return cls(**kw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options", "overrides"):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def resolve_recipe(name: str) -> str:
    """A recipe path, or a bare name looked up in launch/recipes/ (with or without .yaml)."""
    for cand in (name, name + ".yaml", os.path.join(RECIPES_DIR, name), os.path.join(RECIPES_DIR, name + ".yaml")):
        if os.path.isfile(cand):
            return cand
    known = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml")) if os.path.isdir(RECIPES_DIR) else []
    close = difflib.get_close_matches(os.path.basename(name).replace(".yaml", ""), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; recipes in launch/recipes: {', '.join(known)}"
    raise ConfigError(f"recipe {name!r} not found{hint}")


def read_recipe(path: str, _seen=()) -> dict:
    """The recipe's mapping with its ``base:`` chain merged in (paths relative to the recipe)."""
    if path in _seen:
        raise ConfigError(f"recipe {path} includes itself through base:")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of sections")
    base = data.pop("base", None)
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        data = _merge(read_recipe(resolve_recipe(base_path), _seen + (path,)), data)
    return data


def parse_override(item: str) -> tuple:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def load_config(recipe: str, overrides: Optional[List[str]] = None, stage: Optional[str] = None) -> Config:
    """Recipe (name or path) + stage overlay + ``section.key=value`` overrides -> Config."""
    path = resolve_recipe(recipe)
    data = read_recipe(path)
    stages = data.pop("stages", None) or {}
    if stage is not None:
        if stage not in stages and stages:
            close = difflib.get_close_matches(stage, list(stages), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"it has: {', '.join(stages)}"
            raise ConfigError(f"recipe {path} has no stage {stage!r}; {hint}")
        data = _merge(data, {"objective": {"name": stage}})
        data = _merge(data, stages.get(stage) or {})
    name = os.path.splitext(os.path.basename(path))[0]
    data.setdefault("name", f"{name}/{stage}" if stage else name)
    _check_keys(Config, data, f"recipe {path}")
    for item in overrides or []:
        key, value = parse_override(item)
        if key.split(".")[0] != "name" and not any(key == k or key.startswith(k + ".") for k in valid_keys()):
            close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
            raise ConfigError(f"unknown key '{key}' in --set {item}" + (f"; did you mean '{close[0]}'?" if close else ""))
        _set_dotted(data, key, value)
    return _build(Config, data, f"recipe {path}")


def config_from_dict(data: dict) -> Config:
    _check_keys(Config, data, "config")
    return _build(Config, dict(data), "config")
