"""The embedded corpus (Python stdlib source) and its tokenizer, on CPU in seconds:

* the per-file split is a fixed function of the path (golden values; a change would silently move
  files between train and valid and invalidate the committed teachers' cards);
* building the corpus twice gives identical bytes; excluded directories, undecodable, empty and
  U+2581 files stay out; CRLF is normalised; adding a file moves no other file;
* the SentencePiece tokenizer trained on it loads as HF files with ``AutoTokenizer`` offline, gives
  SentencePiece's ids and decodes code back exactly; training is deterministic;
* the megatron datasets: train + valid concatenated, with a ``data.split`` that megatron turns into
  exactly the train files and exactly the valid files.
"""

import json
import os

import pytest

from megatron_attnedit.data import corpus, tokenizer

# Golden: (path, split) under the 5% rule. Chosen from CPython 3.11's valid split and a few trains.
GOLDEN = [("asyncio/futures.py", "valid"), ("collections/abc.py", "valid"), ("pickle.py", "valid"),
          ("xml/sax/xmlreader.py", "valid"), ("os.py", "train"), ("json/decoder.py", "train"), ("typing.py", "train")]


def test_split_is_a_fixed_function_of_the_path():
    for path, split in GOLDEN:
        assert corpus.split_of(path) == split, path
    paths = [f"pkg{i}/mod{j}.py" for i in range(50) for j in range(40)]
    share = sum(corpus.split_of(p) == "valid" for p in paths) / len(paths)
    assert 0.04 < share < 0.06, share
    assert corpus.split_of("a.py", 0.5) in ("train", "valid")


def _fake_stdlib(root):
    files = {
        "os.py": "import sys\r\nx = 1\r\n",
        "json/__init__.py": "from .decoder import *\n",
        "json/decoder.py": "def f():\n\treturn '<s>'  # trailing  \n",
        "empty/__init__.py": "\n\n",
        "test/test_os.py": "assert True\n",
        "ctypes/test/test_x.py": "pass\n",
        "idlelib/idle_test/t.py": "pass\n",
        "site-packages/pkg/mod.py": "pass\n",
        "marker.py": "x = '\u2581'\n",
        "README.txt": "not python\n",
    }
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    with open(os.path.join(root, "latin1.py"), "wb") as f:
        f.write("s = 'caf\u00e9'\n".encode("latin-1"))
    for i in range(60):  # enough files that both splits are non-empty
        with open(os.path.join(root, f"m{i:02d}.py"), "w") as f:
            f.write(f"def f{i}(x):\n    return x + {i}\n")


def test_corpus_contents_and_determinism(tmp_path):
    root = tmp_path / "lib"
    _fake_stdlib(str(root))
    m1 = corpus.build_corpus(str(tmp_path / "a"), root=str(root))
    m2 = corpus.build_corpus(str(tmp_path / "b"), root=str(root))
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert m1["splits"] == m2["splits"]
    assert m1["skipped"] == {"empty": 1, "has_u2581": 1, "not_utf8": 1}
    docs = {}
    for split in corpus.SPLITS:
        for line in open(tmp_path / "a" / f"{split}.jsonl", encoding="utf-8"):
            d = json.loads(line)
            assert corpus.split_of(d["path"]) == split
            docs[d["path"]] = d["text"]
    assert sorted(docs) == sorted(["os.py", "json/__init__.py", "json/decoder.py"] + [f"m{i:02d}.py" for i in range(60)])
    assert docs["os.py"] == "import sys\nx = 1\n"  # CRLF normalised
    assert docs["json/decoder.py"] == "def f():\n\treturn '<s>'  # trailing  \n"  # everything else untouched
    assert m1["splits"]["valid"]["files"] + m1["splits"]["train"]["files"] == len(docs)
    assert list(corpus.read_split(str(tmp_path / "a"), "valid")) == [t for p, t in sorted(docs.items()) if corpus.split_of(p) == "valid"]

    # A new file moves no other file (splits are per path), and the in-memory split agrees.
    (root / "zz_new.py").write_text("y = 2\n")
    m3 = corpus.build_corpus(str(tmp_path / "c"), root=str(root))
    new_split = corpus.split_of("zz_new.py")
    old = "valid" if new_split == "train" else "train"
    assert m3["splits"][old]["sha256"] == m1["splits"][old]["sha256"]
    assert [p for p, _ in corpus.split_files("valid", root=str(root))] == [p for p in sorted(docs) + ["zz_new.py"] if corpus.split_of(p) == "valid"]


def test_corpus_of_this_interpreter(tmp_path):
    m = corpus.build_corpus(str(tmp_path))
    s = m["splits"]
    assert m["interpreter"]["stdlib"] == corpus.stdlib_dir()
    assert s["train"]["files"] > 300 and s["valid"]["files"] > 10, s
    assert 0.02 < s["valid"]["files"] / (s["train"]["files"] + s["valid"]["files"]) < 0.08
    paths = [json.loads(line)["path"] for line in open(tmp_path / "train.jsonl")]
    assert "os.py" in paths and paths == sorted(paths)
    assert not any(set(p.split("/")[:-1]) & corpus.EXCLUDED_DIRS for p in paths)


def test_missing_stdlib_is_one_line(tmp_path):
    with pytest.raises(corpus.DataError, match="not found"):
        corpus.build_corpus(str(tmp_path / "out"), root=str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

EDGE_CASES = [
    "", " ", "  leading", "trailing  ", "\n\n\n", "\tindented\twith\ttabs\n", "a\r\nb\rc", "x  =  1\n        return\n",
    "caf\u00e9 \u4e2d\u6587 \U0001F40D \u00a0nbsp", "'<s>' + \"</s>\" + '<unk>' + '<pad>'", "\x00\x01 control \x7f",
    "def f(a, b):\n    '''Doc.'''\n    return a ** b  # comment\n",
]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """vocab 512 on ~1.5 MB of this interpreter's train split (about 2 s)."""
    texts, size = [], 0
    for path, text in corpus.iter_files(keep=lambda p: corpus.split_of(p) == "train"):
        texts.append(text)
        size += len(text)
        if size > 1_500_000:
            break
    out = str(tmp_path_factory.mktemp("tok"))
    tokenizer.build(texts, out, vocab_size=512, fingerprint="test")
    return out, texts


def test_tokenizer_files_load_offline_and_match_sentencepiece(small_tokenizer, monkeypatch):
    import sentencepiece as spm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = small_tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", tokenizer.META_FILE):
        assert os.path.isfile(os.path.join(out, name)), name
    hf = tokenizer.load_hf(out)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert len(hf) == sp.get_piece_size() == 512
    for text in EDGE_CASES:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert hf.decode(ids) == text, repr(text)
        assert 1 not in ids and 2 not in ids  # literal "<s>"/"</s>" are text, and no BOS/EOS is added
    assert hf("x = 1").input_ids == hf.encode("x = 1", add_special_tokens=False)  # no BOS by default

    # The project's data-side tokenizer (preprocess_data.py) reads the same files.
    from megatron_attnedit.training.data import Tokenizer

    t = Tokenizer(out)
    assert (t.kind, t.eod, t.vocab_size) == ("hf", 2, 512)
    assert t.tokenize(EDGE_CASES[-1]) == sp.encode(EDGE_CASES[-1])


def test_tokenizer_round_trips_the_valid_split(small_tokenizer):
    out, _ = small_tokenizer
    files = corpus.split_files("valid")
    r = tokenizer.verify(out, (t for _, t in files))
    assert r["texts"] == len(files) and r["tokens"] > 50_000
    assert r["id_mismatches"] == 0 and r["roundtrip_failures"] == 0, r


def test_tokenizer_training_is_deterministic(small_tokenizer, tmp_path):
    import sentencepiece as spm

    out, texts = small_tokenizer
    tokenizer.train_sentencepiece(texts, str(tmp_path), vocab_size=512, num_threads=1)

    def vocab(d):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]

    assert vocab(out) == vocab(str(tmp_path))


def test_chunks_cover_the_text_exactly():
    text = "a\n" * 3000 + "x" * 9000 + "\nend"
    chunks = list(tokenizer.training_chunks([text], max_chars=4000))
    assert "".join(chunks) == text and max(map(len, chunks)) <= 4000


# ------------------------------------------------------------------------------------------------
# Megatron datasets of the corpus
# ------------------------------------------------------------------------------------------------


def test_datasets_split_exactly_into_train_and_valid_files(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import normalize

    from megatron_attnedit import teacher

    root = tmp_path / "lib"
    _fake_stdlib(str(root))
    corpus.build_corpus(str(tmp_path / "corpus"), root=str(root))
    texts = list(corpus.read_split(str(tmp_path / "corpus"), "train"))
    tokenizer.build(texts * 20, str(tmp_path / "tok"), vocab_size=300)
    info = teacher.prepare_datasets(str(tmp_path / "corpus"), str(tmp_path / "tok"), str(tmp_path / "ds"))
    n_train, n_valid = info["documents"]["train"], info["documents"]["valid"]
    assert (n_train, n_valid) == (len(texts), len(list(corpus.read_split(str(tmp_path / "corpus"), "valid"))))
    both, train, valid = (IndexedDataset(info["prefixes"][k]) for k in ("train_valid", "train", "valid"))
    assert len(both) == n_train + n_valid
    assert all((both[i] == train[i]).all() for i in range(n_train))
    assert all((both[n_train + i] == valid[i]).all() for i in range(n_valid))
    # megatron's own split arithmetic (BlendedMegatronDatasetBuilder: round(bookend * documents))
    matrix = convert_split_vector_to_split_matrix(normalize([float(x) for x in info["split"].split(",")]))
    bounds = [(int(round(b[0] * len(both))), int(round(b[1] * len(both)))) for b in matrix[:2]]
    assert bounds == [(0, n_train), (n_train, n_train + n_valid)] and matrix[2] is None
    again = teacher.prepare_datasets(str(tmp_path / "corpus"), str(tmp_path / "tok"), str(tmp_path / "ds"))
    assert again == info  # reused
