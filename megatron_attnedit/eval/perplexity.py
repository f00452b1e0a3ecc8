"""Evaluation tokens and held-out perplexity.

Tokens come from a megatron indexed dataset (PREFIX.bin/.idx, read with megatron-core's
IndexedDataset, documents concatenated in order with their end-of-document tokens, as training
reads them) or from text files tokenized with the teacher's tokenizer (each file one document,
end-of-document appended, as ``preprocess_data.py`` does). Every model scores the same tokens.

Same tokenizer? A dataset carries no tokenizer, so four checks, cheapest first, each one line:
1. PREFIX.meta.json (written by preprocess_data.py) records vocab_size and eod: both must equal
   the teacher tokenizer's;
2. it also records the tokenizer it used: when that path still exists, its vocabulary files must
   have the same SHA-256 as the teacher's, compared on the first kind both have (a SentencePiece
   .model, tokenizer.json, vocab.json + merges.txt / vocab.txt; never tokenizer_config.json, which
   changes with cosmetic settings);
3. every evaluated token id must be below the teacher tokenizer's vocabulary size (the config's
   vocab_size when the teacher ships no tokenizer);
4. a student that ships tokenizer files must ship the teacher's (same comparison as 2).
A dataset without meta.json, or whose tokenizer directory is gone, gets check 3 only; the report
says which checks ran.

Perplexity: windows of ``seq_len`` inputs (+1 for the last target) start every ``stride`` tokens;
the first window scores all its targets, later ones only the last ``stride`` (the tokens earlier
windows did not score), so with stride < seq_len every scored token sees at least
seq_len - stride tokens of context. ppl = exp(sum of token NLL / scored tokens), in float64. The
token NLLs are also summed per position in the window (``position_nll``: index j holds the targets
predicted from j + 1 tokens of context), for the loss-by-position report (eval/distance.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
from typing import Callable, List, Optional, Tuple

import numpy as np

from megatron_attnedit.errors import DataError, EvalError
from megatron_attnedit.training import file_patterns
from megatron_attnedit.training.data import Tokenizer, check_prefixes

VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


def tokenizer_files(path: str) -> List[str]:
    """The vocabulary-defining files of a tokenizer directory (or a SentencePiece .model file)."""
    if os.path.isfile(path):
        return [path] if path.endswith(".model") else []
    if not os.path.isdir(path):
        return []
    found = {os.path.join(path, f) for f in VOCAB_FILES if os.path.isfile(os.path.join(path, f))}
    found |= set(glob.glob(os.path.join(path, "*.model")))
    return sorted(found)


# Kinds of vocabulary files, in the order they are compared: a SentencePiece model, tokenizer.json,
# vocab.json + merges.txt / vocab.txt. A directory may hold several kinds (the project's tokenizer
# ships tokenizer.model and the same vocabulary as tokenizer.json); two tokenizers are compared on
# the first kind both have.
_KINDS = (("sentencepiece", lambda f: f.endswith(".model")), ("tokenizer.json", lambda f: f.endswith("tokenizer.json")),
          ("vocab", lambda f: os.path.basename(f) in ("vocab.json", "merges.txt", "vocab.txt")))


def tokenizer_digests(path: str) -> dict:
    """kind -> SHA-256 over that kind's files' contents (file names excluded)."""
    files, out = tokenizer_files(path), {}
    for kind, match in _KINDS:
        mine = sorted(hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files if match(f))
        if mine:
            out[kind] = hashlib.sha256("".join(mine).encode()).hexdigest()
    return out


def same_tokenizer(a: str, b: str) -> Optional[bool]:
    """True / False from the first kind of vocabulary file both ``a`` and ``b`` hold; None when
    they share no kind (nothing to compare)."""
    da, db = tokenizer_digests(a), tokenizer_digests(b)
    for kind, _ in _KINDS:
        if kind in da and kind in db:
            return da[kind] == db[kind]
    return None


def load_tokenizer(model_dir: str):
    """The project's tokenizer wrapper (HF files or SentencePiece), or None if the dir has none."""
    if not tokenizer_files(model_dir) and not os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):
        return None

    try:
        return Tokenizer(model_dir)
    except DataError as e:
        raise EvalError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# Evaluation tokens
# ------------------------------------------------------------------------------------------------


def _prefix_of(data: List[str]) -> Optional[str]:
    if len(data) != 1:
        return None
    p = data[0]
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            p = p[: -len(ext)]
    return p if os.path.isfile(p + ".idx") or os.path.isfile(p + ".bin") else None


def _check_meta(prefix: str, tok, teacher_dir: str, checks: List[str]) -> None:
    meta_path = prefix + ".meta.json"
    if not os.path.isfile(meta_path) or tok is None:
        return
    meta = json.load(open(meta_path))
    if meta.get("vocab_size") not in (None, tok.vocab_size) or meta.get("eod") not in (None, tok.eod):
        raise EvalError(
            f"{prefix} was made with a different tokenizer (vocab {meta.get('vocab_size')}, eod {meta.get('eod')}) than the "
            f"teacher's (vocab {tok.vocab_size}, eod {tok.eod}); re-run preprocess_data.py with --tokenizer-dir {teacher_dir}"
        )
    checks.append("meta.json vocab size and eod")
    src = meta.get("tokenizer")
    same = same_tokenizer(src, teacher_dir) if src and tokenizer_files(src) else None
    if same is False:
        raise EvalError(
            f"{prefix} was tokenized with {src}, whose vocabulary files differ from the teacher's tokenizer in {teacher_dir}; "
            f"re-run preprocess_data.py with --tokenizer-dir {teacher_dir}"
        )
    if same:
        checks.append("tokenizer files (SHA-256)")


def _read_indexed(prefix: str, need: Optional[int]) -> np.ndarray:
    try:
        check_prefixes([prefix])
    except DataError as e:
        raise EvalError(str(e)) from None
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    parts, n = [], 0
    for i in range(len(ds)):
        parts.append(np.asarray(ds[i], dtype=np.int64))
        n += len(parts[-1])
        if need is not None and n >= need:
            break
    return np.concatenate(parts)


def _read_text(data: List[str], tok, need: Optional[int]) -> Tuple[np.ndarray, int]:
    files = file_patterns.expand(
        data, lambda pat: EvalError(f"--data {pat!r} is neither a dataset prefix (PREFIX.bin/.idx) nor matches any text file"))
    parts, n = [], 0
    for f in files:
        text = open(f, encoding="utf-8", errors="replace").read()
        if not text.strip():
            continue
        ids = tok.tokenize(text) + [tok.eod]
        parts.append(np.asarray(ids, dtype=np.int64))
        n += len(ids)
        if need is not None and n >= need:
            break
    if not parts:
        raise EvalError(f"--data {' '.join(data)}: the text files are empty")
    return np.concatenate(parts), len(files)


def load_eval_tokens(data: List[str], teacher_dir: str, vocab_size: int, need: Optional[int] = None) -> dict:
    """{'tokens': int64 array, 'source': description, 'checks': list of the tokenizer checks run}.
    ``need``: read at least this many tokens (None: all)."""
    tok = load_tokenizer(teacher_dir)
    checks: List[str] = []
    prefix = _prefix_of(data)
    if prefix is not None:
        _check_meta(prefix, tok, teacher_dir, checks)
        tokens = _read_indexed(prefix, need)
        source = f"indexed dataset {prefix}"
    else:
        if tok is None:
            raise EvalError(f"the teacher {teacher_dir} has no tokenizer files to tokenize text with; give a dataset prefix (PREFIX.bin/.idx) instead")
        tokens, n_files = _read_text(data, tok, need)
        source = f"{n_files} text file(s) tokenized with the teacher's tokenizer"
    limit = tok.vocab_size if tok is not None else vocab_size
    top = int(tokens.max()) if tokens.size else 0
    if top >= limit or int(tokens.min()) < 0:
        bad = top if top >= limit else int(tokens.min())
        raise EvalError(
            f"token id {bad} in {source} is out of range of the teacher's vocabulary ({limit} ids): "
            f"the data was made with a different tokenizer; re-run preprocess_data.py with --tokenizer-dir {teacher_dir}"
        )
    checks.append(f"token ids < {limit}")
    return dict(tokens=tokens, source=source, checks=checks)


def check_student_tokenizer(student_dir: str, teacher_dir: str) -> None:
    """A student that ships tokenizer files must ship the teacher's."""
    if same_tokenizer(student_dir, teacher_dir) is False:
        raise EvalError(f"student {student_dir} ships a tokenizer whose vocabulary files differ from the teacher's ({teacher_dir}); a student must use its teacher's tokenizer")


# ------------------------------------------------------------------------------------------------
# Perplexity
# ------------------------------------------------------------------------------------------------


def make_windows(n_tokens: int, seq_len: int, stride: int, max_tokens: Optional[int] = None) -> List[Tuple[int, int]]:
    """(begin, first scored target) per window; tokens[begin : begin + seq_len + 1] feed it.
    Whole windows only, stopping before ``max_tokens`` scored tokens would be exceeded (one window
    at least)."""
    if not 1 <= stride <= seq_len:
        raise EvalError(f"--stride {stride} must be in [1, --seq-length {seq_len}]")
    if n_tokens < seq_len + 1:
        raise EvalError(f"the evaluation data holds {n_tokens} tokens, fewer than --seq-length + 1 = {seq_len + 1}; give more data or a shorter --seq-length")
    out, scored, begin = [], 0, 0
    while begin + seq_len + 1 <= n_tokens:
        first = 0 if not out else seq_len - stride
        if out and max_tokens and scored + seq_len - first > max_tokens:
            break
        out.append((begin, first))
        scored += seq_len - first
        begin += stride
    return out


def tokens_needed(seq_len: int, stride: int, max_tokens: Optional[int]) -> Optional[int]:
    """Tokens to read for ``max_tokens`` scored ones (None: all the data)."""
    if not max_tokens:
        return None
    more = max(0, math.ceil((max_tokens - seq_len) / stride))
    return seq_len + 1 + more * stride


def perplexity(logits_fn: Callable, tokens: np.ndarray, windows: List[Tuple[int, int]], seq_len: int, batch_size: int = 4, device="cpu") -> dict:
    """``logits_fn(input_ids [B, seq_len]) -> logits [B, seq_len, vocab]``."""
    import torch

    # Per-token NLL summed by position in the window (float64): the loss-by-position figures
    # (eval/distance.py) come from the same forward passes as the perplexity.
    pos_sum = torch.zeros(seq_len, dtype=torch.float64)
    pos_count = torch.zeros(seq_len, dtype=torch.int64)
    t0 = time.perf_counter()
    data = torch.from_numpy(tokens)
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            seqs = torch.stack([data[b : b + seq_len + 1] for b, _ in chunk]).to(device)
            logits = logits_fn(seqs[:, :-1])
            for row, (_, first) in enumerate(chunk):
                ce = torch.nn.functional.cross_entropy(logits[row, first:].float(), seqs[row, first + 1 :], reduction="none")
                pos_sum[first:] += ce.double().cpu()
                pos_count[first:] += 1
    count = int(pos_count.sum())
    mean = float(pos_sum.sum()) / count
    return dict(ppl=math.exp(mean), mean_nll=mean, scored_tokens=count, windows=len(windows), seq_len=seq_len, seconds=time.perf_counter() - t0,
                position_nll=dict(sum=pos_sum.tolist(), count=pos_count.tolist()))
