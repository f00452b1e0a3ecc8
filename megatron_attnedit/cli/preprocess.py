"""Text -> megatron indexed dataset (PREFIX.bin / PREFIX.idx) with the model's tokenizer.

    attnedit preprocess --input 'corpus/*.jsonl' --tokenizer-dir HF_DIR \\
        --output-prefix data/corpus [--json-key text] [--workers 4]
    (same as: python checkpoints_tools/preprocess_data.py ...)

Inputs (``--input`` repeats; globs, ``**`` recursive): ``.jsonl`` / ``.json`` files hold one JSON
document per line with the text under ``--json-key``; any other file is one plain-text document.
Every document gets the tokenizer's end-of-document token appended. The tokenizer is a directory
of Hugging Face tokenizer files or a SentencePiece ``.model``. Output is written to temporary
files and renamed at the end, so an interrupted run never leaves a dataset that looks valid; a
PREFIX.meta.json sidecar records the tokenizer, documents and tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterator, List

from megatron_attnedit.cli import args
from megatron_attnedit.errors import DataError, run_cli
from megatron_attnedit.training import file_patterns

_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    from megatron_attnedit.training.data import Tokenizer

    _TOKENIZER = Tokenizer(tokenizer_dir)


def _encode(text: str) -> List[int]:
    ids = _TOKENIZER.tokenize(text)
    ids.append(_TOKENIZER.eod)
    return ids


def expand_inputs(patterns: List[str]) -> List[str]:
    return file_patterns.expand(patterns, lambda pat: DataError(f"--input {pat!r} matches no file"))


def documents(files: List[str], json_key: str) -> Iterator[str]:
    for path in files:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        raise DataError(f"{path}:{n} is not valid JSON (jsonl wants one JSON object per line)") from None
                    if not isinstance(obj, dict) or json_key not in obj:
                        raise DataError(f"{path}:{n} has no {json_key!r} key; set --json-key")
                    if obj[json_key]:
                        yield str(obj[json_key])
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                yield text


def main(argv=None) -> int:
    ap = args.parser("attnedit preprocess", __doc__.split("\n\n")[0],
                     "  attnedit preprocess --input 'corpus/*.jsonl' --input 'books/**/*.txt' --tokenizer-dir /models/Qwen3-8B \\\n"
                     "      --output-prefix data/qwen3/pretrain --workers 8")
    ap.add_argument("--input", action="append", required=True, help="file or glob; repeat for more")
    ap.add_argument("--tokenizer-dir", required=True, help="HF tokenizer directory or SentencePiece .model")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args.progress(ap)
    args.debug(ap)
    a = ap.parse_args(argv)
    return run_cli(lambda: _preprocess(a), argv)


def _preprocess(a) -> int:
    from megatron_attnedit.training.data import Tokenizer

    files = expand_inputs(a.input)
    tok = Tokenizer(a.tokenizer_dir)  # DataError: one line
    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    out_dir = os.path.dirname(os.path.abspath(a.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{a.output_prefix}.tmp{os.getpid()}"
    dtype = DType.optimal_dtype(tok.vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    start = time.time()
    pool = None
    if a.workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(a.workers, initializer=_init_worker, initargs=(a.tokenizer_dir,))
        encoded = pool.imap(_encode, documents(files, a.json_key), chunksize=16)
    else:
        _init_worker(a.tokenizer_dir)
        encoded = map(_encode, documents(files, a.json_key))
    try:
        bar = tqdm(encoded, unit="doc", desc=os.path.basename(a.output_prefix), mininterval=1.0, disable=a.no_progress)
        for ids in bar:
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
            if n_docs % 256 == 0:
                bar.set_postfix(docs_per_s=f"{n_docs / (time.time() - start):.0f}", tokens=n_tokens)
        bar.close()
        if n_docs == 0:
            raise DataError(f"no documents found in {len(files)} input file(s); nothing written")
        builder.finalize(tmp + ".idx")
        meta = dict(documents=n_docs, tokens=n_tokens, vocab_size=tok.vocab_size, eod=tok.eod, tokenizer=os.path.abspath(a.tokenizer_dir),
                    dtype=numpy.dtype(dtype).name, inputs=len(files))
        with open(tmp + ".meta.json", "w") as f:
            json.dump(meta, f, indent=1)
        for ext in (".bin", ".idx", ".meta.json"):  # the data first: a .meta.json means the pair beside it is whole
            os.replace(tmp + ext, a.output_prefix + ext)
    finally:
        if pool is not None:
            pool.terminate()
        for ext in (".bin", ".idx", ".meta.json"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    dt = time.time() - start
    print(f"wrote {a.output_prefix}.bin/.idx: {n_docs} documents, {n_tokens} tokens in {dt:.1f}s ({n_docs / max(dt, 1e-9):.0f} documents/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
