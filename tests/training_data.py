"""Test data for the training tests: generated text, a SentencePiece tokenizer trained on it, and
megatron indexed datasets made by checkpoints_tools/preprocess_data.py. Nothing is downloaded."""

import json
import os
import random

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team", "her brother"]
VERBS = ["sees", "likes", "finds", "takes", "reads", "builds", "moves", "paints"]
OBJECTS = ["the ball", "a red box", "the long road", "an apple", "the river", "a book", "the house", "a green hat"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."


def document(rng: random.Random, n_min: int = 5, n_max: int = 30) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(n_min, n_max)))


def write_jsonl(path: str, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": document(rng)}) + "\n")


def train_tokenizer(out_dir: str, vocab_size: int = 120, seed: int = 1) -> str:
    """A SentencePiece BPE model (unk 0, bos 1, eos 2) trained on generated text; returns its path."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    text = os.path.join(out_dir, "tokenizer_train.txt")
    with open(text, "w") as f:
        f.write("\n".join(document(rng, 20, 40) for _ in range(40)))
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", minloglevel=2)
    return prefix + ".model"


def make_corpus(out_dir: str, n_docs: int = 400) -> dict:
    """{'tokenizer': .model path, 'prefix': dataset prefix, 'prefix2': a smaller second one}
    (preprocess_data.py run in-process)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints_tools"))
    import preprocess_data

    tok = train_tokenizer(out_dir)
    jsonl = os.path.join(out_dir, "corpus.jsonl")
    write_jsonl(jsonl, n_docs)
    prefix = os.path.join(out_dir, "corpus")
    preprocess_data.main(["--input", jsonl, "--tokenizer-dir", tok, "--output-prefix", prefix])
    jsonl2 = os.path.join(out_dir, "corpus2.jsonl")
    write_jsonl(jsonl2, 60, seed=7)
    preprocess_data.main(["--input", jsonl2, "--tokenizer-dir", tok, "--output-prefix", prefix + "2"])
    return {"tokenizer": tok, "prefix": prefix, "prefix2": prefix + "2"}
