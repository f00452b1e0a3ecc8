"""A SentencePiece BPE tokenizer for code, and the same tokenizer as Hugging Face files.

Training settings, chosen so that code survives exactly: BPE with ``byte_fallback`` (a character
outside the vocabulary becomes its UTF-8 bytes, never ``<unk>``), ``identity`` normalization (no
NFKC), no whitespace collapsing, no dummy prefix, whitespace-only pieces allowed (indentation runs
become one or two tokens). Only ``" "`` is rewritten (to U+2581, SentencePiece's marker); newlines
and tabs are ordinary characters. Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (end of document: the
separator preprocess_data.py appends), ``<pad>`` 3, then the 256 byte pieces, then the merges.

The HF side is a ``tokenizers`` BPE built from the SentencePiece model through the
``SentencePieceProcessor`` API alone (no protobuf, which the GPU image lacks): the vocabulary in
SentencePiece's order, merges ranked by the merged piece's id (SentencePiece BPE merges the pair
whose result scores highest, and its scores fall with the id), normalizer ``" " -> U+2581``, no
pre-tokenizer (SentencePiece encodes the whole string too), decoder ``U+2581 -> " "`` + byte
fallback + fuse, no BOS, and ``split_special_tokens`` (a literal ``<s>`` or ``</s>`` in a source file
is text, as in SentencePiece; with the bare ``tokenizers`` library set ``encode_special_tokens``). It is written as ``tokenizer.json`` with ``tokenizer_class``
``PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained(dir)`` loads it offline in any
transformers 5.x. (Constructing transformers' ``LlamaTokenizer`` from ``tokenizer.model`` gave empty
encodings in transformers 5.23, and its converter needs protobuf.) ``verify`` checks exact round
trips and identical ids against SentencePiece.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Dict, Iterable, Iterator, List, Optional

from megatron_attnedit.errors import DataError

SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
VOCAB_SIZE = 4096
MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer_meta.json"
_CHUNK_CHARS = 4000  # SentencePiece trains on "sentences"; code is cut at line ends into pieces this long



def training_chunks(texts: Iterable[str], max_chars: int = _CHUNK_CHARS) -> Iterator[str]:
    """Texts cut at line ends into chunks of at most ``max_chars`` (a longer line is cut inside)."""
    for text in texts:
        buf = ""
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:
                if buf:
                    yield buf
                    buf = ""
                yield line[:max_chars]
                line = line[max_chars:]
            if len(buf) + len(line) > max_chars and buf:
                yield buf
                buf = ""
            buf += line
        if buf:
            yield buf


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int = VOCAB_SIZE, num_threads: int = 2) -> str:
    """Train the SentencePiece model on ``texts``; returns ``out_dir/tokenizer.model``."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, f"tokenizer.tmp{os.getpid()}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_chunks(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=False,
            max_sentence_length=4 * _CHUNK_CHARS + 16,  # bytes; chunks are at most _CHUNK_CHARS characters
            input_sentence_size=0,  # use every chunk: SentencePiece's own sampling is not seeded
            shuffle_input_sentence=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=SPECIALS["unk"], bos_piece=SPECIALS["bos"], eos_piece=SPECIALS["eos"], pad_piece=SPECIALS["pad"],
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}") from None
    final = os.path.join(out_dir, MODEL_FILE)
    os.replace(prefix + ".model", final)
    os.remove(prefix + ".vocab")
    return final


def hf_tokenizer(model_path: str):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece BPE model at ``model_path``."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != n:
        raise DataError(f"{model_path} has duplicate pieces; cannot build a BPE vocabulary")
    mergeable = {p: i for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, i in mergeable.items():
        local = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in mergeable and piece[k:] in mergeable]
        merges += [(i, l, r, a, b) for l, r, a, b in sorted(local)]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=SPECIALS["unk"], byte_fallback=True, fuse_unk=True, ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(Regex(" "), "\u2581")
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(SPECIALS[k], special=True, normalized=False) for k in ("unk", "bos", "eos", "pad")])
    return tok


def write_hf_files(model_path: str, out_dir: str) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ tokenizer.model) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    hf_tokenizer(model_path).save(os.path.join(out_dir, "tokenizer.json"))
    special = {f"{k}_token": v for k, v in SPECIALS.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # True would rewrite " ." to "." on decode
        "split_special_tokens": True,  # "<s>" written in a source file is text, not the BOS id
        "padding_side": "right",
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    if os.path.abspath(os.path.dirname(model_path)) != os.path.abspath(out_dir):
        shutil.copyfile(model_path, os.path.join(out_dir, MODEL_FILE))


def build(texts: Iterable[str], out_dir: str, vocab_size: int = VOCAB_SIZE, num_threads: int = 2,
          fingerprint: Optional[str] = None) -> dict:
    """Train, write the HF files next to ``tokenizer.model``, write ``tokenizer_meta.json`` last."""
    import sentencepiece

    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted rebuild must not look complete
    model = train_sentencepiece(texts, out_dir, vocab_size, num_threads)
    write_hf_files(model, out_dir)
    meta = {
        "vocab_size": vocab_size,
        "special_ids": {k: i for i, k in enumerate(SPECIALS)},
        "trained_on": fingerprint,
        "sentencepiece": sentencepiece.__version__,
        "model_sha256": hashlib.sha256(open(model, "rb").read()).hexdigest(),
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def load_meta(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, META_FILE)
    return json.load(open(path)) if os.path.isfile(path) else None


def load_hf(tokenizer_dir: str):
    """``AutoTokenizer.from_pretrained(tokenizer_dir)`` (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def verify(tokenizer_dir: str, texts: Iterable[str]) -> Dict[str, int]:
    """Encode every text with SentencePiece and with the HF tokenizer of ``tokenizer_dir``:
    counts of texts, tokens, id mismatches and round-trip failures (both should be 0)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, MODEL_FILE))
    hf = load_hf(tokenizer_dir)
    out = {"texts": 0, "tokens": 0, "id_mismatches": 0, "roundtrip_failures": 0}
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        out["texts"] += 1
        out["tokens"] += len(ids)
        out["id_mismatches"] += ids != sp.encode(text)
        out["roundtrip_failures"] += hf.decode(ids) != text
    return out


def encode_documents(tokenizer, texts: Iterable[str]) -> Iterator[List[int]]:
    """Each text's ids followed by the end-of-document id, as preprocess_data.py writes them."""
    eos = tokenizer.eos_token_id
    for text in texts:
        yield tokenizer.encode(text, add_special_tokens=False) + [eos]
