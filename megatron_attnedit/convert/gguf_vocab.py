"""The tokenizer of an HF directory in GGUF, with the settings that make llama.cpp tokenize
exactly as ``transformers`` does.

  SentencePiece (``tokenizer.model``)  llama.cpp's ``llama`` tokenizer: pieces, scores and types
      as SentencePiece holds them, and ``add_space_prefix`` from the model's own normaliser
      (``add_dummy_prefix``). llama.cpp assumes a dummy prefix when the key is absent, so a
      vocabulary trained without one (the bundled teacher's) tokenizes the first word of every
      text differently ('def' -> 941 instead of 321) unless the key says false.
  byte-level BPE (``tokenizer.json``)  llama.cpp's ``gpt2`` tokenizer: tokens, merges, and the
      pre-tokenizer named by its split pattern. llama.cpp's own converter recognises a pre-tokenizer
      by hashing the token ids of a test string, which fails for any vocabulary it has not seen
      (a Qwen3 vocabulary retrained, or cut down); the split pattern is what the pre-tokenizer is,
      whatever the vocabulary, so it is matched here (``PRE_TOKENIZERS``).

Special tokens (bos / eos / unk / pad ids, add_bos / add_eos, chat template) come from
``gguf.SpecialVocab``, llama.cpp's own reader of tokenizer_config.json / generation_config.json.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

from megatron_attnedit.errors import CheckpointError

# split patterns of byte-level BPE pre-tokenizers -> llama.cpp's name for the same pre-tokenizer
# (LLAMA_VOCAB_PRE_TYPE_* in llama-vocab.cpp, chosen by tokenizer.ggml.pre)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {QWEN2_PATTERN: "qwen2"}


def has_tokenizer(d: Optional[str]) -> bool:
    return bool(d) and any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.model", "tokenizer.json"))


def add_tokenizer(writer, hf_dir: str, vocab_size: int) -> str:
    """Write the tokenizer of ``hf_dir`` into ``writer`` (a gguf.GGUFWriter); returns its kind."""
    import gguf

    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        n = _sentencepiece(writer, hf_dir, vocab_size)
        kind = "sentencepiece"
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        n = _byte_level_bpe(writer, hf_dir, vocab_size)
        kind = "byte-level BPE"
    else:
        raise CheckpointError(f"{hf_dir} has no tokenizer.model or tokenizer.json; a GGUF needs the tokenizer: copy the teacher's tokenizer files there")
    special = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=n)
    special.add_to_gguf(writer, quiet=True)
    return kind


def _sentencepiece(writer, hf_dir: str, vocab_size: int) -> int:
    import gguf
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = os.path.join(hf_dir, "tokenizer.model")
    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        sp = SentencePieceProcessor(model_file=path)
    except Exception as e:  # protobuf / sentencepiece errors have no common base
        raise CheckpointError(f"{path} is not a SentencePiece model ({type(e).__name__}); re-copy the tokenizer files") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        # llama.cpp's SentencePiece tokenizer merges pairs by score: exact for BPE models only
        raise CheckpointError(
            f"{path} is a SentencePiece {pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} model; "
            "llama.cpp tokenizes SentencePiece BPE models only"
        )
    n = sp.vocab_size()
    if n > vocab_size:
        raise CheckpointError(f"{path} has {n} pieces but config.json's vocab_size is {vocab_size}; the tokenizer does not belong to these weights")
    tokens: List[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(n):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL)
    for i, tok in _added_tokens(hf_dir):
        if i >= n and i < vocab_size:  # tokens added on top of the SentencePiece pieces
            tokens[i], scores[i] = tok["content"].encode("utf-8"), -1000.0
            types[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    return vocab_size


def _byte_level_bpe(writer, hf_dir: str, vocab_size: int) -> int:
    import gguf

    path = os.path.join(hf_dir, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; re-copy the tokenizer files") from None
    model = tj.get("model") or {}
    pattern = _split_pattern(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pattern is None:
        raise CheckpointError(
            f"{path} is not a byte-level BPE tokenizer (model {model.get('type')!r}, no ByteLevel pre-tokenizer with a split pattern); "
            "the GGUF export handles SentencePiece BPE (tokenizer.model) and byte-level BPE vocabularies"
        )
    pre = PRE_TOKENIZERS.get(pattern)
    if pre is None:
        raise CheckpointError(
            f"{path} splits text with a pattern llama.cpp's tokenizers are not known to share ({pattern[:60]}...); "
            f"known: {', '.join(sorted(PRE_TOKENIZERS.values()))}"
        )
    vocab = dict(model["vocab"])
    added = dict(_added_tokens(hf_dir))
    for i, tok in added.items():
        vocab[tok["content"]] = i
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{path} has token ids up to {max(vocab.values())} but config.json's vocab_size is {vocab_size}; the tokenizer does not belong to these weights")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for i, tok in added.items():
        types[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return vocab_size


def _split_pattern(pre) -> str | None:
    """The regex of a byte-level pre-tokenizer: Sequence[Split(regex), ByteLevel(use_regex=False)]
    (Qwen2 / Qwen3), or None when it is not of that form."""
    if not isinstance(pre, dict):
        return None
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    splits = [p for p in parts or [] if p.get("type") == "Split"]
    byte_level = [p for p in parts or [] if p.get("type") == "ByteLevel"]
    if len(splits) != 1 or len(byte_level) != 1 or byte_level[0].get("use_regex", True):
        return None
    return (splits[0].get("pattern") or {}).get("Regex")


def _added_tokens(hf_dir: str):
    """(id, {content, special}) of the tokens tokenizer.json adds to its model's vocabulary."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [(int(t["id"]), t) for t in json.load(f).get("added_tokens", [])]
