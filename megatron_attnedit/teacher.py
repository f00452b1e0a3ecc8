"""The bundled teachers: tiny Qwen3 and Qwen3-MoE pretrained by this project on the Python standard library.

``bash launch/train_teacher.sh dense|moe OUT_DIR`` makes one; its steps are the subcommands of
``python -m megatron_attnedit.teacher``:

``data --out D``              corpus of this interpreter's stdlib (D/corpus) + SentencePiece/HF tokenizer
                              (D/tokenizer; reused when it was trained on the same corpus)
``datasets --tokenizer-dir T --out D``  megatron datasets of the corpus made with tokenizer T:
                              D/train, D/valid and D/train_valid (train files then valid files, with the
                              ``data.split`` that separates them exactly), described in D/datasets.json
``init --kind K --tokenizer-dir T --out D``  config.json of the architecture + tokenizer files: the
                              ``model.hf_dir`` a ``random_init`` run starts from
``card --hf-dir H ...``       held-out loss of an exported teacher, README.md (model card) + teacher_card.json
``eval --hf-dir H``           held-out loss on this interpreter's valid split (what the CPU test checks)

Held-out loss is measured per valid file, with the HF model in fp32: the file's tokens, preceded and
followed by the end-of-document token as in training, scored in consecutive windows of
``seq_len`` positions (no context across windows). The card reports the whole valid split
(``seq_len`` 1024, every window) and the bounded protocol of the test (``seq_len`` 512, first
window of each file, at most ~20K tokens), with per-file sums so that another interpreter's
stdlib can be compared on the files both have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Tuple

from megatron_attnedit.convert.outdir import add_to_manifest
from megatron_attnedit.data import corpus, tokenizer
from megatron_attnedit.data import tokenizer as tok_lib
from megatron_attnedit.errors import DataError, run_cli, strip_debug
from megatron_attnedit.families import moe_layer_pattern, num_experts

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "teachers")
NAMES = {"dense": "qwen3-tiny-stdlib", "moe": "qwen3-moe-tiny-stdlib"}
CARD_JSON = "teacher_card.json"
PROTOCOL = {"seq_len": 512, "max_windows_per_file": 1}
"""The bounded held-out protocol (card and CPU test): first 512 positions of every valid file."""
FULL = {"seq_len": 1024, "max_windows_per_file": None}

# Shapes (HF config fields). Untied embeddings and vocab 4096 as in Qwen3-8B / 30B-A3B's layout
# (untied), at ~6.8M parameters: 13.7 MB of bf16 safetensors, under the 16 MB budget.
_COMMON = dict(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    intermediate_size=768, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
    max_position_embeddings=2048, attention_bias=False, hidden_act="silu", initializer_range=0.02,
)
ARCHITECTURES = {
    "dense": dict(model_type="qwen3", **_COMMON),
    # 8 experts top-2 (SwiGLU 128 each, renormalised top-k as Qwen3-30B-A3B), first layer dense:
    # 7.8M parameters (15.6 MB bf16), 4.9M active per token; a third of the dense MLP compute.
    "moe": dict(model_type="qwen3_moe", **_COMMON, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], router_aux_loss_coef=0.001),
}



def bundled_teacher(kind: str = "dense") -> Optional[str]:
    """The committed teacher's HF directory, or None when it is not in this checkout."""
    if kind not in NAMES:
        raise DataError(f"unknown teacher kind {kind!r}; use one of {', '.join(NAMES)}")
    d = os.path.join(ASSETS_DIR, NAMES[kind])
    return d if os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, CARD_JSON)) else None


# ------------------------------------------------------------------------------------------------
# data: corpus + tokenizer; datasets: megatron .bin/.idx
# ------------------------------------------------------------------------------------------------


def prepare_data(out_dir: str, vocab_size: int = 4096, valid_fraction: Optional[float] = None) -> Tuple[str, str]:
    """(corpus dir, tokenizer dir) under ``out_dir``; the tokenizer is kept when it was trained on
    exactly this train split with this vocabulary size."""

    cdir, tdir = os.path.join(out_dir, "corpus"), os.path.join(out_dir, "tokenizer")
    manifest = corpus.build_corpus(cdir, valid_fraction=valid_fraction or corpus.VALID_FRACTION)
    fp = manifest["splits"]["train"]["sha256"]
    meta = tokenizer.load_meta(tdir)
    if meta and meta.get("trained_on") == fp and meta.get("vocab_size") == vocab_size:
        print(f"tokenizer {tdir}: reused (trained on this corpus)", flush=True)
    else:
        start = time.time()
        tokenizer.build(corpus.read_split(cdir, "train"), tdir, vocab_size, fingerprint=fp)
        print(f"tokenizer {tdir}: trained, vocab {vocab_size}, {time.time() - start:.1f}s", flush=True)
    s = manifest["splits"]
    print(f"corpus {cdir}: Python {manifest['interpreter']['version']} stdlib, {s['train']['files']} train / "
          f"{s['valid']['files']} valid files ({s['train']['bytes'] / 1e6:.1f} / {s['valid']['bytes'] / 1e6:.2f} MB)", flush=True)
    return cdir, tdir


def _sha_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _preprocess(args: List[str]) -> None:
    import importlib

    # Imported under its own name from a sys.path entry: with --workers > 1 its spawned tokenizer
    # processes unpickle its functions by module name, and spawn passes them the parent's sys.path
    # (a module loaded from a file under a made-up name could not be found there).
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints_tools")
    if tools not in sys.path:
        sys.path.append(tools)
    importlib.import_module("preprocess_data").main(args)


POOL_MIN_BYTES = 32_000_000
"""Splits smaller than this are tokenized in this process: one process encodes ~1 MB/s of library
code, and a pool of 16 took ~18 s to start on the H100 machine (launch/results/scale_study_h100_drills_unfinished:
the 4 MB held-out split took 18.8 s with 16 processes)."""


def prepare_datasets(corpus_dir: str, tokenizer_dir: str, out_dir: str, workers: int = 1) -> dict:
    """Megatron datasets of the corpus with the tokenizer: ``train``, ``valid`` and ``train_valid``
    (train files, then valid files; ``split`` is the ``data.split`` string that puts exactly the
    train files in megatron's train split and the valid files in its validation split). Reused
    when corpus and tokenizer are unchanged. Returns (and writes) ``out_dir/datasets.json``."""

    manifest = corpus.load_manifest(corpus_dir)
    tok_file = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise DataError(f"{tokenizer_dir} has no tokenizer.json; give a teacher or tokenizer directory made by this project")
    key = {s: manifest["splits"][s]["sha256"] for s in corpus.SPLITS}
    key["tokenizer"] = _sha_file(tok_file)
    info_path = os.path.join(out_dir, "datasets.json")
    if os.path.isfile(info_path):
        info = json.load(open(info_path))
        if info.get("key") == key and all(os.path.isfile(p + ".idx") for p in info["prefixes"].values()):
            print(f"datasets {out_dir}: reused", flush=True)
            return info
        os.remove(info_path)
    os.makedirs(out_dir, exist_ok=True)
    train, valid = (os.path.join(corpus_dir, f"{s}.jsonl") for s in corpus.SPLITS)
    prefixes = {name: os.path.join(out_dir, name) for name in ("train", "valid", "train_valid")}
    for split, path in (("train", train), ("valid", valid)):
        # a pool of tokenizer processes pays for its start (each imports transformers: ~18 s for 16 of
        # them on the GPU machine) only on a large split; the held-out 2% is tokenized here
        n = workers if manifest["splits"][split]["bytes"] >= POOL_MIN_BYTES else 1
        _preprocess(["--input", path, "--output-prefix", prefixes[split], "--tokenizer-dir", tokenizer_dir, "--workers", str(n)])
    n_train, n_valid = (json.load(open(prefixes[s] + ".meta.json"))["documents"] for s in ("train", "valid"))
    _concatenate([prefixes["train"], prefixes["valid"]], prefixes["train_valid"])
    split = f"{n_train},{n_valid},0"
    _check_split(n_train, n_valid)
    info = {"key": key, "prefixes": prefixes, "split": split, "documents": {"train": n_train, "valid": n_valid},
            "tokens": {s: json.load(open(prefixes[s] + ".meta.json"))["tokens"] for s in ("train", "valid")},
            "corpus": os.path.abspath(corpus_dir), "tokenizer": os.path.abspath(tokenizer_dir)}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


def _concatenate(parts: List[str], out: str) -> None:
    """One dataset holding ``parts`` in order (megatron's builder appends .bin/.idx; no re-tokenizing)."""
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        _IndexReader,
    )

    dtype = _IndexReader(parts[0] + ".idx", multimodal=False).dtype
    tmp = f"{out}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    for p in parts:
        builder.add_index(p)
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", out + ".bin")
    os.replace(tmp + ".idx", out + ".idx")
    metas = [json.load(open(p + ".meta.json")) for p in parts]
    meta = {**metas[0], "documents": sum(m["documents"] for m in metas), "tokens": sum(m["tokens"] for m in metas),
            "parts": [os.path.abspath(p) for p in parts]}
    with open(out + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)


def _check_split(n_train: int, n_valid: int) -> None:
    """megatron's document split of "n_train,n_valid,0" (BlendedMegatronDatasetBuilder: normalise,
    cumulative book-ends, round(bookend * documents)) must fall exactly between the two."""
    n = n_train + n_valid
    fractions = [n_train / n, n_valid / n]
    bounds = [int(round(0.0 * n)), int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))]
    if bounds != [0, n_train, n]:
        raise DataError(f"data.split {n_train},{n_valid},0 would not separate the files exactly ({bounds})")


# ------------------------------------------------------------------------------------------------
# init: the architecture as an HF config directory
# ------------------------------------------------------------------------------------------------


def hf_config(kind: str, vocab_size: int, special_ids: Dict[str, int], overrides: Optional[dict] = None) -> dict:
    """The teacher's config.json content, written by the installed transformers' own config class.
    ``overrides``: shape fields replacing the kind's (the scale study's larger teacher)."""
    from transformers import AutoConfig

    if kind not in ARCHITECTURES:
        raise DataError(f"unknown teacher kind {kind!r}; use one of {', '.join(ARCHITECTURES)}")
    kw = dict(ARCHITECTURES[kind], **(overrides or {}))
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=special_ids["bos"],
                                  eos_token_id=special_ids["eos"], pad_token_id=special_ids["pad"], **kw)
    out = config.to_diff_dict()  # what save_pretrained writes
    out["architectures"] = ["Qwen3ForCausalLM" if kind == "dense" else "Qwen3MoeForCausalLM"]
    out["dtype"] = "bfloat16"
    return out


def write_init_dir(kind: str, tokenizer_dir: str, out_dir: str, overrides: Optional[dict] = None) -> dict:
    import shutil

    meta = tok_lib.load_meta(tokenizer_dir)
    if meta is None:
        raise DataError(f"{tokenizer_dir} is not a tokenizer made by `teacher data` (no {tok_lib.META_FILE})")
    cfg = hf_config(kind, meta["vocab_size"], meta["special_ids"], overrides)
    os.makedirs(out_dir, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


# ------------------------------------------------------------------------------------------------
# Held-out loss
# ------------------------------------------------------------------------------------------------


def _windows(ids: List[int], eos: int, seq_len: int, max_windows: Optional[int]):
    """(inputs, targets) windows of one document: [eos] + ids + [eos], predicted position by position."""
    doc = [eos] + ids + [eos]
    out = []
    for start in range(0, len(doc) - 1, seq_len):
        if max_windows is not None and len(out) >= max_windows:
            break
        chunk = doc[start : start + seq_len + 1]
        out.append((chunk[:-1], chunk[1:]))
    return out


def heldout_loss(model, tokenizer, files: Iterable[Tuple[str, str]], seq_len: int, max_windows_per_file: Optional[int] = None,
                 device: str = "cpu") -> dict:
    """Mean next-token loss (nats) over the windows of every file; per-file [loss sum, tokens, sha256]."""
    import torch
    import torch.nn.functional as F

    eos = tokenizer.eos_token_id
    per_file, total, count = {}, 0.0, 0
    model.eval()
    with torch.no_grad():
        for path, text in files:
            s, n = 0.0, 0
            for inp, tgt in _windows(tokenizer.encode(text, add_special_tokens=False), eos, seq_len, max_windows_per_file):
                logits = model(torch.tensor([inp], device=device)).logits[0].float()
                s += float(F.cross_entropy(logits, torch.tensor(tgt, device=device), reduction="sum"))
                n += len(tgt)
            per_file[path] = [s, n, hashlib.sha256(text.encode("utf-8")).hexdigest()]
            total += s
            count += n
    if count == 0:
        raise DataError("no held-out tokens: the valid split is empty")
    return {"loss": total / count, "tokens": count, "files": per_file}


def load_model(hf_dir: str, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(hf_dir, name)):
            raise DataError(f"{hf_dir} has no {name}; give an HF model directory with its tokenizer (e.g. a teacher exported by train_teacher.sh)")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).to(device)
    return model, tok_lib.load_hf(hf_dir)


def evaluate_dir(hf_dir: str, protocol: dict, files: Optional[List[Tuple[str, str]]] = None, device: str = "cpu") -> dict:
    """Held-out loss of the HF model in ``hf_dir`` on ``files`` (default: this interpreter's valid split)."""

    files = corpus.split_files("valid") if files is None else files
    model, tok = load_model(hf_dir, device)
    return heldout_loss(model, tok, files, protocol["seq_len"], protocol["max_windows_per_file"], device)


def compare_on_common_files(card_files: Dict[str, list], local_files: Dict[str, list]) -> dict:
    """Loss on the files both evaluations have (token-weighted), and on those with identical text."""
    def pooled(paths, table):
        s = sum(table[p][0] for p in paths)
        n = sum(table[p][1] for p in paths)
        return s / n if n else float("nan")

    common = sorted(set(card_files) & set(local_files))
    same = [p for p in common if card_files[p][2] == local_files[p][2]]
    return {"common_files": len(common), "identical_files": len(same),
            "card_common": pooled(common, card_files), "local_common": pooled(common, local_files),
            "card_identical": pooled(same, card_files), "local_identical": pooled(same, local_files)}


# ------------------------------------------------------------------------------------------------
# card: figures + README.md
# ------------------------------------------------------------------------------------------------


def parameter_counts(hf_dir: str, cfg: dict) -> Dict[str, int]:
    from safetensors import safe_open

    total, size = 0, 0
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            size += os.path.getsize(os.path.join(hf_dir, name))
            with safe_open(os.path.join(hf_dir, name), "pt") as f:
                for k in f.keys():
                    shape = f.get_slice(k).get_shape()
                    total += math.prod(shape)

    moe_layers = sum(moe_layer_pattern(cfg))
    inactive = 0
    if moe_layers:
        per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
        inactive = moe_layers * (num_experts(cfg) - int(cfg["num_experts_per_tok"])) * per_expert
    embeddings = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2)
    return {"total": total, "active": total - inactive, "embeddings": embeddings, "safetensors_bytes": size}


def read_run_metrics(run_dir: str) -> dict:
    """Last train loss, last validation loss and the number of logged iterations of a run."""
    out: dict = {"val_curve": []}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    for line in open(path):
        if not line.strip():
            continue
        rec = json.loads(line)
        it = int(rec["iteration"])
        if "loss" in rec:
            out.update(train_loss=rec["loss"], iteration=it, tokens_per_s=rec.get("tokens_per_s"))
        if "val_loss" in rec:
            out["val_loss"] = rec["val_loss"]
            out["val_curve"] = [p for p in out["val_curve"] if p[0] < it] + [[it, round(rec["val_loss"], 4)]]
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def write_card(hf_dir: str, kind: str, corpus_dir: str, datasets_dir: str, run_dir: str, command: str,
               train_seconds: Optional[float] = None, device: str = "cpu") -> dict:
    """Evaluate the exported teacher in ``hf_dir`` and write teacher_card.json + README.md there."""
    import torch
    import transformers
    import yaml

    manifest = corpus.load_manifest(corpus_dir)
    tokens = json.load(open(os.path.join(datasets_dir, "datasets.json")))["tokens"]
    splits = {k: {**v, "tokens": tokens[k]} for k, v in manifest["splits"].items()}
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    run_cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    metrics = read_run_metrics(run_dir)
    d, t = run_cfg["data"], run_cfg["training"]
    steps = metrics.get("iteration", t["train_iters"])
    valid = [json.loads(line) for line in open(os.path.join(corpus_dir, "valid.jsonl"), encoding="utf-8")]
    files = [(v["path"], v["text"]) for v in valid]
    model, tok = load_model(hf_dir, device)
    full = heldout_loss(model, tok, files, FULL["seq_len"], FULL["max_windows_per_file"], device)
    bounded = heldout_loss(model, tok, files, PROTOCOL["seq_len"], PROTOCOL["max_windows_per_file"], device)
    params = parameter_counts(hf_dir, cfg)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    card = {
        "name": NAMES.get(kind, kind),
        "kind": kind,
        "command": command,
        "interpreter": manifest["interpreter"],
        "corpus": {"excluded_dirs": manifest["excluded_dirs"], "valid_fraction": manifest["valid_fraction"],
                   "splits": splits, "skipped": manifest["skipped"]},
        "tokenizer": {"type": "SentencePiece BPE, byte fallback, identity normalization", "vocab_size": cfg["vocab_size"]},
        "parameters": params,
        "training": {
            "steps": steps, "seq_length": d["seq_length"], "global_batch_size": d["global_batch_size"],
            "micro_batch_size": d["micro_batch_size"], "tokens_seen": steps * d["global_batch_size"] * d["seq_length"],
            "optimizer": run_cfg["optimizer"], "platform": t.get("platform"), "device": device_name,
            "precision": "bf16" if (t.get("bf16") if t.get("bf16") is not None else t.get("platform") != "cpu") else "fp32",
            "seconds": train_seconds, "final_train_loss": metrics.get("train_loss"),
            "final_val_loss_in_loop": metrics.get("val_loss"), "val_curve": metrics["val_curve"],
            "tokens_per_s": metrics.get("tokens_per_s"),
        },
        "heldout": {
            "full": {**FULL, "loss": full["loss"], "perplexity": math.exp(full["loss"]), "tokens": full["tokens"]},
            "protocol": {**PROTOCOL, "loss": bounded["loss"], "perplexity": math.exp(bounded["loss"]), "tokens": bounded["tokens"],
                         "files": bounded["files"]},
            "uniform_loss": math.log(cfg["vocab_size"]),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with open(os.path.join(hf_dir, CARD_JSON), "w") as f:
        json.dump(card, f, indent=1)
        f.write("\n")
    with open(os.path.join(hf_dir, "README.md"), "w") as f:
        f.write(render_card(card, cfg))

    # part of the export now: mcore_to_hf --overwrite (OVERWRITE=1 train_teacher.sh) replaces them with it
    add_to_manifest(hf_dir, [CARD_JSON, "README.md"], "teacher card")
    return card


def render_card(card: dict, cfg: dict) -> str:
    tr, ho, p, c = card["training"], card["heldout"], card["parameters"], card["corpus"]
    interp = card["interpreter"]
    s = c["splits"]
    moe = cfg.get("model_type") == "qwen3_moe"
    arch = (f"Qwen3{'-MoE' if moe else ''}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads x {cfg['head_dim']}, q/k RMSNorm, RoPE theta "
            f"{cfg.get('rope_theta', (cfg.get('rope_parameters') or {}).get('rope_theta'))}, ")
    if moe:
        arch += (f"layer 0 dense SwiGLU {cfg['intermediate_size']}, layers 1-{cfg['num_hidden_layers'] - 1} "
                 f"{cfg.get('num_experts') or cfg.get('num_local_experts')} experts top-{cfg['num_experts_per_tok']} "
                 f"(SwiGLU {cfg['moe_intermediate_size']}, softmax router, renormalised top-k)")
    else:
        arch += f"SwiGLU {cfg['intermediate_size']}"
    arch += f", vocab {cfg['vocab_size']}, {'tied' if cfg.get('tie_word_embeddings') else 'untied'} embeddings"
    opt = tr["optimizer"]
    secs = f"{tr['seconds']:.0f} s" if tr.get("seconds") else "n/a"
    val_curve = ", ".join(f"{it}: {v:.3f}" for it, v in tr["val_curve"]) or "n/a"
    f = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [qwen3{', qwen3_moe' if moe else ''}, tiny, python, megatron-attnedit]
---

# {card['name']}

A tiny {'Qwen3-MoE' if moe else 'Qwen3'} language model of Python source code, pretrained from scratch by
[megatron-attnedit](../../../../README.md) with its own megatron-core training loop (`lm` objective), on the
Python standard library. It is the project's bundled teacher for attention conversion (MLA, GateSWA): a
genuinely trained model that every machine can rebuild and test without downloads. It is not useful for
anything else.

| | |
|---|---|
| architecture | {arch} |
| parameters | {_fmt_params(p['total'])} total{f", {_fmt_params(p['active'])} active per token" if moe else ""} (embeddings + LM head {_fmt_params(p['embeddings'])}); {p['safetensors_bytes'] / 1e6:.1f} MB bf16 safetensors |
| tokenizer | SentencePiece BPE trained on the train split: vocab {cfg['vocab_size']}, byte fallback, identity normalization, exact whitespace; `<unk>` 0, `<s>` 1, `</s>` 2 (end of document), `<pad>` 3 |
| data | {interp['implementation']} {interp['version']} standard library, `*.py` without {', '.join(f'`{d}/`' for d in c['excluded_dirs'])}: {s['train']['files']} train files ({s['train']['bytes'] / 1e6:.1f} MB, {s['train']['tokens']:,} tokens), {s['valid']['files']} valid files ({s['valid']['bytes'] / 1e6:.2f} MB, {s['valid']['tokens']:,} tokens); split per file by SHA-256 of its path ({c['valid_fraction']:.0%} valid) |
| training | {tr['steps']:,} steps x {tr['global_batch_size']} sequences x {tr['seq_length']} tokens = **{tr['tokens_seen']:,} tokens seen** ({tr['tokens_seen'] / s['train']['tokens']:.1f} passes over the train split); AdamW lr {opt['lr']:g} -> {opt['min_lr']:g} ({opt['lr_decay_style']}, warmup {opt['lr_warmup_iters']}), weight decay {opt['weight_decay']:g}, clip {opt['clip_grad']:g}; {tr['precision']} on {tr['device']}, {secs} |
| final train loss | {f(tr['final_train_loss'])} |
| **held-out loss** (valid split, all {ho['full']['tokens']:,} tokens, windows of {ho['full']['seq_len']}) | **{ho['full']['loss']:.4f}** nats/token, perplexity **{ho['full']['perplexity']:.2f}** (a uniform guess: loss {ho['uniform_loss']:.2f}) |
| held-out loss, test protocol (first {ho['protocol']['seq_len']} positions of each valid file, {ho['protocol']['tokens']:,} tokens) | {ho['protocol']['loss']:.4f} (perplexity {ho['protocol']['perplexity']:.2f}) |
| validation loss during training (step: loss) | {val_curve} |

## Command

```bash
{card['command']}
```

It builds the corpus and tokenizer (`python -m megatron_attnedit.teacher data`), writes megatron datasets
with `checkpoints_tools/preprocess_data.py`, trains from random initialisation with
`python -m megatron_attnedit.train --recipe launch/recipes/teacher_{card['kind']}.yaml` (objective `lm`), exports with
`checkpoints_tools/mcore_to_hf.py --dtype bfloat16` and writes this card (`python -m megatron_attnedit.teacher card`).
Versions: torch {card['versions']['torch']}, transformers {card['versions']['transformers']}.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("def read_lines(path):\\n", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))
```

## Held-out loss

Each valid file is scored on its own with the model in fp32: `</s>` + the file's tokens + `</s>`, predicted
position by position in consecutive windows (no context across windows). `teacher_card.json` keeps the
per-file sums of the test protocol, so that the CPU test (`tests/test_teacher.py`) can re-measure on another
interpreter's standard library and compare on the files both have (`python -m megatron_attnedit.teacher eval
--hf-dir megatron_attnedit/assets/teachers/{card['name']}` prints the same figures).

Data license: the training text is CPython's standard library (Python Software Foundation License).
"""


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_attnedit.teacher", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("data", help="corpus (this interpreter's stdlib) + tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p = sub.add_parser("datasets", help="megatron datasets of the corpus with a tokenizer")
    p.add_argument("--corpus", help="corpus dir (default: build this interpreter's into OUT/corpus)")
    p.add_argument("--tokenizer-dir", required=True, help="tokenizer or teacher HF directory")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--print", dest="field", help="print this field of datasets.json (e.g. split)")
    p = sub.add_parser("init", help="config.json + tokenizer: the model.hf_dir of a random-init run")
    p.add_argument("--kind", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("card", help="evaluate an exported teacher, write README.md + teacher_card.json")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--kind", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--corpus", required=True)
    p.add_argument("--datasets", required=True, help="the datasets dir (datasets.json: token counts)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--command", required=True, help="the command line that made it (goes into the card)")
    p.add_argument("--train-seconds", type=float)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("eval", help="held-out loss on this interpreter's valid split")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--full", action="store_true", help="every window at seq 1024 (default: the test protocol)")
    p.add_argument("--device", default="auto")
    a = ap.parse_args(strip_debug(argv))  # --debug (anywhere) or ATTNEDIT_DEBUG=1: the traceback of an error

    def body():
        if a.cmd == "data":
            prepare_data(a.out, a.vocab_size)
        elif a.cmd == "datasets":
            corpus_dir = a.corpus
            if corpus_dir is None:
                corpus_dir = os.path.join(a.out, "corpus")
                corpus.build_corpus(corpus_dir)
            info = prepare_datasets(corpus_dir, a.tokenizer_dir, a.out, a.workers)
            if a.field:
                print(info[a.field] if not isinstance(info[a.field], dict) else json.dumps(info[a.field]))
        elif a.cmd == "init":
            write_init_dir(a.kind, a.tokenizer_dir, a.out)
        elif a.cmd == "card":
            card = write_card(a.hf_dir, a.kind, a.corpus, a.datasets, a.run_dir, a.command, a.train_seconds, _device(a.device))
            h = card["heldout"]["full"]
            print(f"{a.hf_dir}: held-out loss {h['loss']:.4f} (perplexity {h['perplexity']:.2f}) on {h['tokens']:,} tokens; "
                  f"card written to {os.path.join(a.hf_dir, 'README.md')}")
        elif a.cmd == "eval":
            proto = FULL if a.full else PROTOCOL
            r = evaluate_dir(a.hf_dir, proto, device=_device(a.device))
            print(f"held-out loss {r['loss']:.4f} (perplexity {math.exp(r['loss']):.2f}) on {r['tokens']:,} tokens of "
                  f"{len(r['files'])} valid files (Python {sys.version.split()[0]}, seq_len {proto['seq_len']})")
    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
