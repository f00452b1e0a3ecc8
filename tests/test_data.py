"""checkpoints_tools/preprocess_data.py: text -> megatron indexed datasets with the model's tokenizer."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from training_data import document, train_tokenizer

TOOL = os.path.join(ROOT, "checkpoints_tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_jsonl_and_plain_text_round_trip(tokenizer, tmp_path):
    import random

    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = random.Random(3)
    docs = [document(rng) for _ in range(6)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs[:4]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
        f.write("\n")  # blank lines are skipped
    os.makedirs(tmp_path / "txt")
    for i, d in enumerate(docs[4:]):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, TOOL, "--input", str(tmp_path / "a.jsonl"), "--input", str(tmp_path / "txt" / "*.txt"),
                           "--json-key", "body", "--tokenizer-dir", tokenizer, "--output-prefix", str(tmp_path / "out" / "ds")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 documents" in proc.stdout and "documents/s" in proc.stdout
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ds = IndexedDataset(str(tmp_path / "out" / "ds"))
    assert len(ds) == 6
    for i, d in enumerate(docs):
        assert ds[i].tolist() == sp.encode(d) + [sp.eos_id()]  # EOD appended to every document
    meta = json.load(open(tmp_path / "out" / "ds.meta.json"))
    assert meta["documents"] == 6 and meta["eod"] == sp.eos_id() and meta["vocab_size"] == sp.get_piece_size()
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def test_bad_input_is_one_line_and_writes_nothing(tokenizer, tmp_path):
    """Each bad input: exit 2 and one 'error: ...' line on stderr (the real script), nothing written."""
    out = str(tmp_path / "ds")

    def fails(*args):
        proc = subprocess.run([sys.executable, TOOL, "--output-prefix", out, "--no-progress", *args], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
        return lines[0]

    assert "matches no file" in fails("--tokenizer-dir", tokenizer, "--input", str(tmp_path / "nothing*.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert "bad.jsonl:2 has no 'text' key" in fails("--tokenizer-dir", tokenizer, "--input", str(tmp_path / "bad.jsonl"))
    (tmp_path / "notjson.jsonl").write_text('{"text": "fine"}\n{text: unquoted}\n')
    assert "notjson.jsonl:2 is not valid JSON" in fails("--tokenizer-dir", tokenizer, "--input", str(tmp_path / "notjson.jsonl"))
    (tmp_path / "blank.txt").write_text("   \n")
    assert "no documents found" in fails("--tokenizer-dir", tokenizer, "--input", str(tmp_path / "blank.txt"))
    assert "no tokenizer at" in fails("--tokenizer-dir", str(tmp_path), "--input", str(tmp_path / "blank.txt"))
    assert not any(f.startswith("ds") for f in os.listdir(tmp_path))
