"""GGUF exports in llama.cpp (llama-cpp-python 0.3.36 built from source by launch/install.sh --test).

The bundled teacher (checkpoints_tools/hf_to_gguf.py) and a quickstart-shape MLA student
(megatron checkpoint -> mcore_to_hf.py --gguf, the user's one command) load in llama.cpp as
written; on a few token sequences their logits match transformers within 1e-4 (float32 weights
and KV cache), and decoding one token at a time through llama.cpp's cache gives the logits of one
full evaluation. Text tokenizes as transformers tokenizes it: the teacher's SentencePiece
vocabulary (no dummy prefix) and a byte-level BPE vocabulary with Qwen2's pre-tokenizer built here.
MoE layouts (Qwen3-MoE; DeepSeek-V2 with a dense first layer) by logits too. GateSWA is refused in
one line with nothing written. llama.cpp runs in tests/workers/llama_cpp_eval.py: a loader
assertion aborts that process, not the test run.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

TEACHER = os.path.join(ROOT, "megatron_attnedit", "assets", "teachers", "qwen3-tiny-stdlib")
TOL = 1e-4
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import os\nimport sys\n\n\nclass Path(object):\n\t'''A path.'''\n    x = {'a': [1, 2, 3]}  # 12345 67.89e-3\n",
    " leading space, then  two  spaces and trailing   ",
    "naïve café — über 日本語 ✓ I've been told he's there; we'LL see\r\nend",
]
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def llama_cpp_run(gguf_path, work, sequences=(), texts=(), vocab_only=False):
    """llama.cpp's logits (full and cached, per sequence) and token ids (per text) for one GGUF."""
    job, out = os.path.join(work, "job.json"), os.path.join(work, "llama.npz")
    with open(job, "w") as f:
        json.dump({"sequences": [list(map(int, s)) for s in sequences], "texts": list(texts), "vocab_only": vocab_only}, f)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "llama_cpp_eval.py"), gguf_path, job, out],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, f"llama.cpp failed on {gguf_path} ({proc.returncode}):\n{proc.stderr[-3000:]}"
    z = np.load(out)
    return {k: z[k] for k in z.files if k != "tokens"}, json.loads(str(z["tokens"]))


def hf_logits(hf_dir, seq):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([list(seq)])).logits[0].numpy()


def hf_tokens(hf_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def sequences(hf_dir, vocab):
    """Token sequences: real text as the model's tokenizer cuts it, and random ids (every row of the vocabulary is fair game)."""
    g = torch.Generator().manual_seed(0)
    return [hf_tokens(hf_dir, TEXTS[:1])[0], torch.randint(0, vocab, (37,), generator=g).tolist()]


def export_gguf(hf_dir, out, *args):
    from megatron_attnedit.cli.convert import hf_to_gguf_main

    assert hf_to_gguf_main(["--hf-dir", str(hf_dir), "--out", str(out), "--no-progress", *args]) == 0
    return str(out)


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """The worker's megatron students exported with mcore_to_hf.py --gguf (see tests/workers/gguf_students.py)."""
    w = tmp_path_factory.mktemp("gguf_students")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "gguf_students.py"), str(w)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return w, json.load(open(w / "result.json"))


@pytest.fixture(scope="module")
def models(students, tmp_path_factory):
    """name -> (HF directory, its float32 GGUF, llama.cpp results on its sequences)."""
    w, result = students
    assert result["mla-f32"]["rc"] == 0 and result["mla"]["rc"] == 0, result
    t = tmp_path_factory.mktemp("gguf_teacher")
    out = {"teacher": (TEACHER, export_gguf(TEACHER, t / "teacher-f32.gguf", "--dtype", "float32")),
           "mla": (str(w / "out" / "mla-f32"), str(w / "out" / "mla-f32" / "model.gguf"))}
    return {name: (hf, g, llama_cpp_run(g, str(t), sequences(hf, 4096), TEXTS)) for name, (hf, g) in out.items()}


@pytest.mark.parametrize("name", ["teacher", "mla"])
def test_logits_match_transformers(models, name):
    hf, _, (logits, _) = models[name]
    for i, seq in enumerate(sequences(hf, 4096)):
        ref, got = hf_logits(hf, seq), logits[f"full_{i}"]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= TOL, (name, i, float(np.abs(got - ref).max()))
        assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", ["teacher", "mla"])
def test_cached_decode_equals_full_evaluation(models, name):
    hf, _, (logits, _) = models[name]
    for i in range(len(sequences(hf, 4096))):
        full, step = logits[f"full_{i}"], logits[f"step_{i}"]
        assert np.abs(step - full).max() <= TOL, (name, i, float(np.abs(step - full).max()))


@pytest.mark.parametrize("name", ["teacher", "mla"])
def test_text_tokenizes_as_transformers(models, name):
    hf, _, (_, tokens) = models[name]
    assert tokens == hf_tokens(hf, TEXTS)
    assert tokens[0][0] == 321  # 'def' with no dummy prefix (llama.cpp's default prefix gives 941)


def test_byte_level_bpe_tokenizes_as_transformers(tmp_path):
    """A byte-level BPE vocabulary (Qwen2 / Qwen3's pre-tokenizer) trained here: no hash of a known
    vocabulary can recognise it; its split pattern does."""
    hf = tmp_path / "hf"
    shutil.copytree(TEACHER, hf, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    byte_level_tokenizer(hf, 1000)
    g = export_gguf(hf, tmp_path / "m.gguf")
    _, tokens = llama_cpp_run(g, str(tmp_path), texts=TEXTS, vocab_only=True)
    assert tokens == hf_tokens(hf, TEXTS)
    assert max(len(t) for t in tokens) < max(len(t.encode()) for t in TEXTS)  # merges were applied


def byte_level_tokenizer(hf_dir, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_attnedit.convert.gguf_vocab import QWEN2_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [open(os.path.join(os.path.dirname(os.__file__), f), encoding="utf-8").read() for f in ("os.py", "json/decoder.py", "textwrap.py")]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(hf_dir))


def test_moe_layouts_match_transformers(tmp_path):
    """Qwen3-MoE (llama.cpp qwen3moe) and DeepSeek-V2 MoE with a dense first layer and the
    students' zero-width shared experts (deepseek2: a zero shared expert)."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from megatron_attnedit.testing import make_tiny_hf

    vocab = 320
    qmoe, ds = tmp_path / "qwen3moe", tmp_path / "deepseek2"
    make_tiny_hf(str(qmoe), "qwen3-moe-debug", seed=2, mlp_only_layers=[], vocab_size=vocab)
    cfg = DeepseekV2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0,
                           first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                           v_head_dim=16, n_group=1, topk_group=1, initializer_range=0.2, max_position_embeddings=512,
                           rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(ds))
    for hf in (qmoe, ds):
        byte_level_tokenizer(hf, vocab)
        g = export_gguf(hf, tmp_path / f"{hf.name}.gguf")
        seqs = sequences(str(hf), vocab)
        logits, _ = llama_cpp_run(g, str(tmp_path), seqs)
        for i, seq in enumerate(seqs):
            ref = hf_logits(str(hf), seq)
            assert np.abs(logits[f"full_{i}"] - ref).max() <= TOL, (hf.name, i, float(np.abs(logits[f"full_{i}"] - ref).max()))
            assert np.abs(logits[f"step_{i}"] - ref).max() <= TOL, (hf.name, i)


# --------------------------------------------------------------------------------------------
# What is written: metadata, dtypes, refusals
# --------------------------------------------------------------------------------------------


def _reader(path):
    import gguf

    return gguf.GGUFReader(path)


def _field(r, key):
    f = r.get_field(key)
    return None if f is None else f.contents()


def test_mla_metadata_is_what_llama_cpp_needs(students):
    w, _ = students
    r = _reader(str(w / "out" / "mla" / "model.gguf"))
    assert _field(r, "general.architecture") == "deepseek2"
    assert _field(r, "deepseek2.attention.q_lora_rank") == 0  # full-rank queries, any layer count
    assert _field(r, "deepseek2.leading_dense_block_count") == 6 and _field(r, "deepseek2.block_count") == 6
    for key in ("expert_group_count", "expert_group_used_count", "expert_count", "expert_used_count"):
        assert _field(r, f"deepseek2.{key}") is None, key  # a dense student: no experts, no groups
    assert (_field(r, "deepseek2.attention.kv_lora_rank"), _field(r, "deepseek2.rope.dimension_count")) == (96, 32)
    assert (_field(r, "deepseek2.attention.key_length_mla"), _field(r, "deepseek2.attention.value_length_mla")) == (96, 64)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}  # GGUF order: innermost first
    assert shapes["blk.0.attn_k_b.weight"] == (64, 96, 4) and shapes["blk.0.attn_v_b.weight"] == (96, 64, 4)
    assert "blk.0.attn_kv_b.weight" not in shapes and "blk.0.attn_q.weight" in shapes
    cfg = json.load(open(w / "out" / "mla" / "config.json"))
    assert not {"n_group", "topk_group", "topk_method", "scoring_func"} & set(cfg)  # the HF config too
    # written inside the export, listed in its manifest: the export's --overwrite replaces it with the rest
    from megatron_attnedit.convert import outdir

    assert "model.gguf" in outdir.read_manifest(str(w / "out" / "mla"))["paths"]


def test_teacher_tokenizer_metadata(models):
    r = _reader(models["teacher"][1])
    assert _field(r, "general.architecture") == "qwen3"
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.add_space_prefix") is False
    assert _field(r, "tokenizer.ggml.add_bos_token") is False


@pytest.mark.parametrize("which,dtype", [("teacher-default", "BF16"), ("mla", "BF16"), ("mla-f32", "F32")])
def test_gguf_tensors_are_the_declared_dtype(students, tmp_path, which, dtype):
    """Matrices in the file type's dtype (the teacher's declared bfloat16 by default); 1-D tensors
    and norms float32, as llama.cpp expects."""
    import gguf

    w, _ = students
    path = export_gguf(TEACHER, tmp_path / "t.gguf") if which == "teacher-default" else str(w / "out" / which / "model.gguf")
    r = _reader(path)
    assert _field(r, "general.file_type") == {"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F32": gguf.LlamaFileType.ALL_F32}[dtype]
    for t in r.tensors:
        small = len(t.shape) == 1 or t.name.endswith("_norm.weight")
        assert t.tensor_type.name == ("F32" if small else dtype), (t.name, t.tensor_type.name)
    hf = TEACHER if which == "teacher-default" else str(w / "out" / which)
    assert json.load(open(os.path.join(hf, "config.json")))["dtype"] == {"BF16": "bfloat16", "F32": "float32"}[dtype]


@pytest.mark.parametrize("name,words", [("gateswa", ("GateSWA", "no architecture", "gpt-oss", "Gemma 3")),
                                        ("no-tokenizer", ("carries no tokenizer", "without --gguf"))])
def test_refused_in_one_line_nothing_written(students, name, words):
    w, result = students
    r = result[name]
    lines = r["stderr"].splitlines()
    assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
    assert all(x in lines[0] for x in words), lines[0]
    assert not (w / "out" / name).exists() and not [n for n in os.listdir(w / "out") if ".partial-" in n]


def test_output_file_rules(tmp_path, capsys):
    """--out: refused over a file that is not a GGUF or without --overwrite; written aside and renamed;
    a GGUF written into an export directory joins its manifest (so the export's --overwrite replaces it)."""
    from megatron_attnedit.convert import outdir
    from megatron_attnedit.cli.convert import hf_to_gguf_main

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    argv = lambda out, *a: ["--hf-dir", TEACHER, "--out", str(out), "--no-progress", *a]  # noqa: E731
    assert hf_to_gguf_main(argv(notes, "--overwrite")) == 2 and notes.read_text() == "mine"
    assert "is not a GGUF file" in capsys.readouterr().err
    g = export_gguf(TEACHER, tmp_path / "t.gguf")
    assert hf_to_gguf_main(argv(g)) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert hf_to_gguf_main(argv(g, "--overwrite")) == 0
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "t.gguf"]  # no partial left
    export = tmp_path / "export"
    shutil.copytree(TEACHER, export)
    (export / outdir.MANIFEST).write_text(json.dumps({"tool": "mcore_to_hf", "paths": sorted(os.listdir(TEACHER))}))
    export_gguf(export, export / "model.gguf")
    assert "model.gguf" in outdir.read_manifest(str(export))["paths"]
    outdir.check_output_dir(str(export), True, "mcore_to_hf")  # nothing foreign: mcore_to_hf --overwrite may replace it
