"""Training data: megatron-core indexed datasets (.bin/.idx) read through GPTDataset and blends.

``checkpoints_tools/preprocess_data.py`` writes the datasets with the model's tokenizer; here they
are checked (missing prefix, empty dataset -> one line, before anything heavy starts), blended
with weights by ``BlendedMegatronDatasetBuilder`` and served as micro-batches. The sample order is
a pure function of the seed and the dataset, and the position is the number of consumed samples,
so a resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Dict, Iterator, List, Optional

from megatron_attnedit.errors import DataError

_IDX_MAGIC = b"MMIDIDX\x00\x00"


# ------------------------------------------------------------------------------------------------
# Tokenizers: HF tokenizer files or a SentencePiece model, as megatron's datasets want them
# ------------------------------------------------------------------------------------------------


class Tokenizer:
    """The few things megatron's GPTDataset and our preprocessing need from a tokenizer."""

    def __init__(self, path: str):
        self.path = path
        sp_model = path if path.endswith(".model") and os.path.isfile(path) else None
        if sp_model is None and os.path.isdir(path) and not _has_hf_tokenizer(path):
            models = sorted(glob.glob(os.path.join(path, "*.model")))
            sp_model = models[0] if models else None
        if sp_model:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
            self.kind, self.vocab_size, self.eod = "sentencepiece", self._sp.get_piece_size(), self._sp.eos_id()
        elif os.path.isdir(path) and _has_hf_tokenizer(path):
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(path)
            eod = self._hf.eos_token_id
            self.kind, self.vocab_size, self.eod = "hf", len(self._hf), -1 if eod is None else int(eod)
        else:
            raise DataError(f"no tokenizer at {path}: give a directory with tokenizer.json / tokenizer.model, or a SentencePiece .model file")
        if self.eod < 0:
            raise DataError(f"tokenizer {path} has no end-of-sequence token; documents need one to be separated")
        # megatron's dataset cache key is built from these.
        self.unique_identifiers = {"class": "Tokenizer", "kind": self.kind, "path": os.path.abspath(path), "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> List[int]:
        if self.kind == "sentencepiece":
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: List[int]) -> str:
        if self.kind == "sentencepiece":
            return self._sp.decode(list(ids))
        return self._hf.decode(list(ids))


def _has_hf_tokenizer(d: str) -> bool:
    return any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


# ------------------------------------------------------------------------------------------------
# Checks that run before torch is imported
# ------------------------------------------------------------------------------------------------


def index_counts(prefix: str) -> tuple:
    """(documents, sequences) from PREFIX.idx's header; DataError for a missing or foreign file."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset {prefix}{ext} not found; make it with checkpoints_tools/preprocess_data.py --output-prefix {prefix}")
    with open(prefix + ".idx", "rb") as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[:9] != _IDX_MAGIC:
        raise DataError(f"{prefix}.idx is not a megatron indexed dataset index; re-run preprocess_data.py")
    (sequences,) = struct.unpack("<Q", head[18:26])
    (doc_index_len,) = struct.unpack("<Q", head[26:34])
    return max(doc_index_len - 1, 0), sequences


# megatron.core.datasets.indexed_dataset.DType codes -> bytes per token
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def token_count(prefix: str, sequences: int) -> int:
    """Tokens in PREFIX.bin, checked against what PREFIX.idx says it holds (a cut-short or foreign
    .bin would be read past its end by megatron's memory map)."""
    with open(prefix + ".idx", "rb") as f:
        f.seek(17)
        itemsize = _ITEMSIZE.get(f.read(1)[0])
        if itemsize is None or sequences == 0:
            return 0
        f.seek(34 + 4 * (sequences - 1))
        last_len = struct.unpack("<i", f.read(4))[0]
        f.seek(34 + 4 * sequences + 8 * (sequences - 1))
        raw = f.read(8)
    if len(raw) < 8:
        raise DataError(f"{prefix}.idx is cut short; re-run preprocess_data.py")
    want, have = struct.unpack("<q", raw)[0] + last_len * itemsize, os.path.getsize(prefix + ".bin")
    if have != want:
        raise DataError(f"{prefix}.bin is {have:,} bytes but its index describes {want:,}; the pair does not belong together or "
                        "one was cut short: re-run preprocess_data.py")
    return have // itemsize


def check_prefixes(prefixes: List[str], seq_length: Optional[int] = None) -> Dict[str, int]:
    """Every prefix exists and holds at least one document (and, given ``seq_length``, more tokens
    than one sample needs: megatron would repeat a shorter dataset within every sample); returns
    documents per prefix."""
    counts = {}
    for p in prefixes:
        docs, seqs = index_counts(p)
        if docs == 0 or seqs == 0 or os.path.getsize(p + ".bin") == 0:
            raise DataError(f"dataset {p} is empty (0 documents); check the input given to preprocess_data.py")
        tokens = token_count(p, seqs)
        if seq_length is not None and tokens < seq_length + 1:
            raise DataError(f"dataset {p} holds {tokens} tokens, fewer than one sample of data.seq_length + 1 = {seq_length + 1}; "
                            "give it more text, or a shorter data.seq_length")
        counts[p] = docs
    return counts


# ------------------------------------------------------------------------------------------------
# Datasets and micro-batches
# ------------------------------------------------------------------------------------------------


def build_datasets(cfg, tokenizer: Tokenizer, train_samples: int, valid_samples: int):
    """(train, valid) datasets of the blend in cfg.data; valid is None without a validation split."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = cfg.data
    train_blend = (list(d.data_path), list(d.data_weights) if d.data_weights else None)
    if d.valid_data_path:  # a held-out set of its own
        layout = dict(blend_per_split=[train_blend, (list(d.valid_data_path), None) if valid_samples else None, None])
    else:
        layout = dict(blend=train_blend, split=d.split)
        if float(d.split.replace("/", ",").split(",")[1]) == 0:
            valid_samples = 0
    config = GPTDatasetConfig(
        random_seed=cfg.training.seed,
        sequence_length=d.seq_length,
        path_to_cache=os.path.join(cfg.run_dir, "data_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,  # causal attention needs no mask tensor
        mid_level_dataset_surplus=0.05,
        **layout,
    )
    # megatron: a blend with explicit weights needs an explicit size for every split it builds.
    sizes = [train_samples, valid_samples or None, None]
    if d.data_weights:
        sizes = [train_samples, valid_samples or 1, 0]
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except (AssertionError, ValueError, IndexError) as e:
        raise DataError(f"cannot build datasets from {d.data_path} (split {d.split}): {e}; too little data for this split?") from None
    if train is None or len(train) == 0:
        raise DataError(f"the train split of {d.data_path} is empty; give more data or a larger train share in data.split")
    return train, (valid if valid_samples else None)


class MicroBatches:
    """Micro-batches of this data-parallel rank, starting at ``consumed`` samples.

    Global batch k holds samples [k*G, (k+1)*G) of the dataset order; DP rank r takes the r-th
    contiguous slice of G/DP samples and cuts it into micro-batches (megatron's pretraining sampler).
    """

    def __init__(self, dataset, consumed: int, micro: int, global_batch: int, dp_rank: int, dp_size: int, device):
        self.dataset, self.consumed = dataset, consumed
        self.micro, self.per_rank = micro, global_batch // dp_size
        self.global_batch, self.dp_rank, self.device = global_batch, dp_rank, device

    def step(self) -> Iterator[Dict[str, "torch.Tensor"]]:  # noqa: F821
        """An iterator over the micro-batches of the next global batch; advances the position."""
        import torch

        start = self.consumed + self.dp_rank * self.per_rank
        self.consumed += self.global_batch
        n = len(self.dataset)
        batches = []
        for m in range(0, self.per_rank, self.micro):
            samples = [self.dataset[(start + m + i) % n] for i in range(self.micro)]
            batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return iter(batches)


def calibration_tokens(prefixes: List[str], n_tokens: int, seq_length: int) -> "torch.Tensor":  # noqa: F821
    """The first ``n_tokens`` tokens of the first dataset, as [n, seq_length] (fewer rows, or shorter
    ones, when the dataset is smaller): the same on every rank, read before training starts, for
    initialisers that weight by the teacher's activations (documents run together, as in training)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefixes[0])
    parts, have = [], 0
    for i in range(len(ds)):
        doc = np.asarray(ds[i], dtype=np.int64)
        parts.append(doc)
        have += doc.size
        if have >= n_tokens:
            break
    flat = np.concatenate(parts)[:n_tokens]
    seq = min(seq_length, flat.size)
    rows = flat.size // seq
    return torch.from_numpy(flat[: rows * seq].copy()).view(rows, seq)


def dataset_summary(prefixes: List[str]) -> str:
    out = []
    for p in prefixes:
        meta = p + ".meta.json"
        info = json.load(open(meta)) if os.path.isfile(meta) else {}
        out.append(f"{p} ({info.get('documents', '?')} docs, {info.get('tokens', '?')} tokens)")
    return ", ".join(out)


def check_tokenizer(tokenizer: Tokenizer, model_vocab: int, prefixes: Optional[List[str]] = None) -> None:
    if tokenizer.vocab_size > model_vocab:
        raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model only {model_vocab}; use the model's tokenizer")
    for p in prefixes or []:
        meta = p + ".meta.json"
        if os.path.isfile(meta):
            info = json.load(open(meta))
            if info.get("vocab_size") not in (None, tokenizer.vocab_size) or info.get("eod") not in (None, tokenizer.eod):
                raise DataError(f"{p} was made with a different tokenizer (vocab {info.get('vocab_size')}, eod {info.get('eod')}) than {tokenizer.path}")
