"""llama.cpp's layouts of the model families we export, one entry per HF ``model_type``.

Each layout checks what llama.cpp can run (one line otherwise), writes the hyper-parameters its
loader reads (``src/models/<arch>.cpp`` in llama.cpp) and plans the tensors: every HF tensor the
config implies, its shape checked from the file header before anything is written, its GGUF name
from the ``gguf`` package's tables. Transforms beyond renaming:

  stack_experts   Qwen3-MoE / DeepSeek-V2 experts -> one [experts, out, in] tensor per projection
  split_kv_b      DeepSeek-V2 ``kv_b_proj`` [heads x (nope + v), kv_lora] -> ``attn_k_b`` [heads,
                  kv_lora, nope] (transposed per head: llama.cpp absorbs it into the query) and
                  ``attn_v_b`` [heads, v, kv_lora], as llama.cpp's MLA path loads them
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import torch

from megatron_attnedit import families
from megatron_attnedit.convert import checks
from megatron_attnedit.errors import CheckpointError


@dataclasses.dataclass
class Planned:
    """One GGUF tensor: its name, torch shape (GGUF stores it reversed), dtype and how to make it."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _rope_theta(cfg: dict, where: str) -> float:
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    kind = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not exported to GGUF (default RoPE only); export the model without it")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


class _Planner:
    """Collects planned tensors from HF names and checks that the plan consumes every HF tensor."""

    def __init__(self, cfg: dict, ckpt, dtype: torch.dtype, arch, where: str):
        import gguf

        self.cfg, self.ckpt, self.dtype, self.where = cfg, ckpt, dtype, where
        self.names = gguf.get_tensor_name_map(arch, int(cfg["num_hidden_layers"]))
        self.plan: List[Planned] = []
        self.used = set()

    def gguf_name(self, hf: str) -> str:
        name = self.names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"no GGUF name for {hf}")
        return name

    def header(self, hf: str, shape: Tuple[int, ...]) -> None:
        """The tensor exists, is a float and has the shape the config implies (header only)."""
        if hf not in self.ckpt.weight_map:
            raise CheckpointError(f"{self.where} lacks tensor {hf} that its config.json implies; is config.json right for these weights?")
        dtype, got = self.ckpt.info(hf)
        checks.check_dtype(dtype, hf, self.where)
        checks.check_shape(got, shape, hf, self.where, implied_by="its config.json")
        self.used.add(hf)

    def _dtype_for(self, gguf_name: str, shape) -> torch.dtype:
        # 1-D tensors, norms and the router: float32, as llama.cpp's converter writes them
        if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or ".ffn_gate_inp." in gguf_name:
            return torch.float32
        return self.dtype

    def copy(self, hf: str, shape: Tuple[int, ...]) -> None:
        self.header(hf, shape)
        name = self.gguf_name(hf)
        self.plan.append(Planned(name, tuple(shape), self._dtype_for(name, shape), lambda: self.ckpt.get(hf)))

    def stack_experts(self, layer: int, n_experts: int, out: int, inp: int) -> None:
        """experts.{e}.{gate,up}_proj [out, inp] and down_proj [inp, out] -> [experts, ...] each."""
        for proj, shape in (("gate_proj", (out, inp)), ("up_proj", (out, inp)), ("down_proj", (inp, out))):
            hf = [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(n_experts)]
            for h in hf:
                self.header(h, shape)
            name = self.gguf_name(f"model.layers.{layer}.mlp.experts.{proj}.weight")
            self.plan.append(Planned(name, (n_experts, *shape), self.dtype, lambda hf=hf: torch.stack([self.ckpt.get(h) for h in hf])))

    def zeros(self, hf_like: str, shape: Tuple[int, ...]) -> None:
        name = self.gguf_name(hf_like)
        self.plan.append(Planned(name, tuple(shape), self._dtype_for(name, shape), lambda: torch.zeros(shape)))

    def embeddings(self) -> None:
        v, h = int(self.cfg["vocab_size"]), int(self.cfg["hidden_size"])
        self.copy("model.embed_tokens.weight", (v, h))
        self.copy("model.norm.weight", (h,))
        if self.cfg.get("tie_word_embeddings"):
            self.used.add("lm_head.weight")  # a tied checkpoint may still store the copy; llama.cpp reuses token_embd
        else:
            self.copy("lm_head.weight", (v, h))

    def finish(self) -> List[Planned]:
        extra = sorted(k for k in set(self.ckpt.keys()) - self.used if not k.endswith(_IGNORED_SUFFIXES))
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise CheckpointError(f"{self.where} holds tensor(s) {', '.join(extra[:3])}{more} that its config.json does not imply; is config.json right for these weights?")
        return self.plan


# --------------------------------------------------------------------------------------------
# Qwen3 / Qwen3-MoE (the teacher)
# --------------------------------------------------------------------------------------------


class _Layout:
    arch_name: str  # llama.cpp's architecture name (general.architecture)

    @classmethod
    def arch(cls):
        """The ``gguf`` package's MODEL_ARCH of ``arch_name`` (its tensor-name tables are keyed by it)."""
        import gguf

        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == cls.arch_name)


class Qwen3(_Layout):
    arch_name = "qwen3"

    @classmethod
    def check(cls, cfg: dict, where: str) -> None:
        if cfg.get("attention_bias"):
            raise CheckpointError(f"{where}: attention_bias is true; llama.cpp's {cls.arch_name} has no attention biases")
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise CheckpointError(f"{where}: use_sliding_window is set; llama.cpp's {cls.arch_name} attends over the whole context")
        _rope_theta(cfg, where)

    @staticmethod
    def head_dim(cfg: dict) -> int:
        return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])

    @classmethod
    def add_hparams(cls, w, cfg: dict) -> None:
        hd = cls.head_dim(cfg)
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(int(cfg["num_attention_heads"]))
        w.add_head_count_kv(int(cfg["num_key_value_heads"]))
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(_rope_theta(cfg, ""))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))

    @classmethod
    def attention(cls, p: _Planner, i: int) -> None:
        cfg, h, hd = p.cfg, int(p.cfg["hidden_size"]), cls.head_dim(p.cfg)
        nh, nkv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
        a = f"model.layers.{i}.self_attn."
        p.copy(a + "q_proj.weight", (nh * hd, h))
        p.copy(a + "k_proj.weight", (nkv * hd, h))
        p.copy(a + "v_proj.weight", (nkv * hd, h))
        p.copy(a + "o_proj.weight", (h, nh * hd))
        p.copy(a + "q_norm.weight", (hd,))
        p.copy(a + "k_norm.weight", (hd,))

    @classmethod
    def mlp(cls, p: _Planner, i: int) -> None:
        h, f = int(p.cfg["hidden_size"]), int(p.cfg["intermediate_size"])
        m = f"model.layers.{i}.mlp."
        p.copy(m + "gate_proj.weight", (f, h))
        p.copy(m + "up_proj.weight", (f, h))
        p.copy(m + "down_proj.weight", (h, f))

    @classmethod
    def plan(cls, cfg: dict, ckpt, dtype: torch.dtype, where: str) -> List[Planned]:
        p = _Planner(cfg, ckpt, dtype, cls.arch(), where)
        h = int(cfg["hidden_size"])
        p.embeddings()
        for i in range(int(cfg["num_hidden_layers"])):
            p.copy(f"model.layers.{i}.input_layernorm.weight", (h,))
            cls.attention(p, i)
            p.copy(f"model.layers.{i}.post_attention_layernorm.weight", (h,))
            cls.mlp(p, i)
        return p.finish()


class Qwen3Moe(Qwen3):
    arch_name = "qwen3moe"

    @classmethod
    def check(cls, cfg: dict, where: str) -> None:
        super().check(cfg, where)
        dense = [i for i, m in enumerate(families.moe_layer_pattern(cfg)) if not m]
        if dense:
            raise CheckpointError(f"{where}: layers {dense} are dense (mlp_only_layers / decoder_sparse_step); llama.cpp's qwen3moe has MoE in every layer")
        if not cfg.get("norm_topk_prob", False):
            raise CheckpointError(f"{where}: norm_topk_prob is false; llama.cpp's qwen3moe always renormalises the top-k routing weights")

    @classmethod
    def add_hparams(cls, w, cfg: dict) -> None:
        super().add_hparams(w, cfg)
        w.add_expert_count(families.num_experts(cfg))
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
        w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))

    @classmethod
    def mlp(cls, p: _Planner, i: int) -> None:
        h, e = int(p.cfg["hidden_size"]), families.num_experts(p.cfg)
        p.copy(f"model.layers.{i}.mlp.gate.weight", (e, h))
        p.stack_experts(i, e, int(p.cfg["moe_intermediate_size"]), h)


# --------------------------------------------------------------------------------------------
# DeepSeek-V2 (the MLA students, as mcore_to_hf exports them)
# --------------------------------------------------------------------------------------------


class DeepseekV2(_Layout):
    arch_name = "deepseek2"

    @staticmethod
    def moe(cfg: dict) -> bool:
        return int(cfg.get("first_k_dense_replace", 0)) < int(cfg["num_hidden_layers"]) and int(cfg.get("n_routed_experts") or 0) > 0

    @classmethod
    def check(cls, cfg: dict, where: str) -> None:
        _rope_theta(cfg, where)
        if cfg.get("attention_bias"):
            raise CheckpointError(f"{where}: attention_bias is true; llama.cpp's deepseek2 has no attention biases")
        if cls.moe(cfg):
            if cfg.get("scoring_func", "softmax") != "softmax" or cfg.get("topk_method", "greedy") != "greedy":
                raise CheckpointError(f"{where}: router {cfg.get('scoring_func')} / {cfg.get('topk_method')}; the GGUF export writes softmax greedy top-k routers (the students')")
            if int(cfg.get("n_group") or 1) > 1:
                raise CheckpointError(f"{where}: n_group {cfg['n_group']}; the students route over all experts (one group)")

    @classmethod
    def add_hparams(cls, w, cfg: dict) -> None:
        import gguf

        n, kvr, rope = int(cfg["num_hidden_layers"]), int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
        w.add_block_count(n)
        w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(int(cfg["num_attention_heads"]))
        # MLA as llama.cpp runs it: one shared "KV head" (the latent + RoPE key), decompressed per head
        w.add_head_count_kv(1)
        w.add_rope_freq_base(_rope_theta(cfg, ""))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(int(cfg["vocab_size"]))
        # 0 = full-rank queries (attn_q); without the key the loader stops unless the layer count is DeepSeek-V2-Lite's
        w.add_q_lora_rank(int(cfg.get("q_lora_rank") or 0))
        w.add_kv_lora_rank(kvr)
        w.add_key_length(kvr + rope)
        w.add_value_length(kvr)
        w.add_key_length_mla(int(cfg["qk_nope_head_dim"]) + rope)
        w.add_value_length_mla(int(cfg["v_head_dim"]))
        w.add_rope_dimension_count(rope)
        if cls.moe(cfg):
            w.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace", 0)))
            w.add_expert_count(int(cfg["n_routed_experts"]))
            w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
            w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
            # Qwen3 has no shared expert; llama.cpp's deepseek2 always runs one: a zero one adds exactly 0
            w.add_expert_shared_count(1)
            w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
            w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
            # no expert-group keys: one group holding every expert is llama.cpp's ungrouped top-k
        else:
            # every layer dense: no experts, no groups (a group count without experts fails the loader)
            w.add_leading_dense_block_count(n)
            w.add_expert_feed_forward_length(int(cfg["intermediate_size"]))  # read unconditionally by the loader
            w.add_expert_shared_count(0)

    @classmethod
    def plan(cls, cfg: dict, ckpt, dtype: torch.dtype, where: str) -> List[Planned]:
        p = _Planner(cfg, ckpt, dtype, cls.arch(), where)
        h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kvr, rope, nope, v = (int(cfg[k]) for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
        qr = int(cfg.get("q_lora_rank") or 0)
        k_dense = int(cfg.get("first_k_dense_replace", 0)) if cls.moe(cfg) else int(cfg["num_hidden_layers"])
        p.embeddings()
        for i in range(int(cfg["num_hidden_layers"])):
            a = f"model.layers.{i}.self_attn."
            p.copy(f"model.layers.{i}.input_layernorm.weight", (h,))
            if qr:
                p.copy(a + "q_a_proj.weight", (qr, h))
                p.copy(a + "q_a_layernorm.weight", (qr,))
                p.copy(a + "q_b_proj.weight", (nh * (nope + rope), qr))
            else:
                p.copy(a + "q_proj.weight", (nh * (nope + rope), h))
            p.copy(a + "kv_a_proj_with_mqa.weight", (kvr + rope, h))
            p.copy(a + "kv_a_layernorm.weight", (kvr,))
            cls.split_kv_b(p, a, nh, nope, v, kvr)
            p.copy(a + "o_proj.weight", (h, nh * v))
            p.copy(f"model.layers.{i}.post_attention_layernorm.weight", (h,))
            if i < k_dense:
                Qwen3.mlp(p, i)
            else:
                e, f = int(cfg["n_routed_experts"]), int(cfg["moe_intermediate_size"])
                p.copy(f"model.layers.{i}.mlp.gate.weight", (e, h))
                p.stack_experts(i, e, f, h)
                s = f"model.layers.{i}.mlp.shared_experts."
                for proj, shape in (("gate_proj", (0, h)), ("up_proj", (0, h)), ("down_proj", (h, 0))):
                    if s + proj + ".weight" in ckpt.weight_map:
                        p.header(s + proj + ".weight", shape)  # the export's 0-wide shared expert: nothing to carry
                p.zeros(s + "gate_proj.weight", (f, h))
                p.zeros(s + "up_proj.weight", (f, h))
                p.zeros(s + "down_proj.weight", (h, f))
        return p.finish()

    @staticmethod
    def split_kv_b(p: _Planner, a: str, nh: int, nope: int, v: int, kvr: int) -> None:
        hf = a + "kv_b_proj.weight"
        p.header(hf, (nh * (nope + v), kvr))

        def part(which: str) -> torch.Tensor:
            kv_b = p.ckpt.get(hf).view(nh, nope + v, kvr)
            k_b, v_b = torch.split(kv_b, [nope, v], dim=1)
            return k_b.transpose(1, 2).contiguous() if which == "k" else v_b.contiguous()

        p.plan.append(Planned(p.gguf_name(a + "k_b_proj.weight"), (nh, kvr, nope), p.dtype, lambda: part("k")))
        p.plan.append(Planned(p.gguf_name(a + "v_b_proj.weight"), (nh, v, kvr), p.dtype, lambda: part("v")))


LAYOUTS: Dict[str, type] = {"qwen3": Qwen3, "qwen3_moe": Qwen3Moe, "deepseek_v2": DeepseekV2}
