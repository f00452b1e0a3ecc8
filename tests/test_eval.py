"""python -m megatron_attnedit.evaluate on tiny random checkpoints: perplexity against a direct
computation, the report's numbers, and bad input (one line, non-zero exit)."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import training_data
from conftest import ROOT
from megatron_attnedit import evaluate
from megatron_attnedit.eval import perplexity
from megatron_attnedit.errors import EvalError
from megatron_attnedit.testing import make_tiny_hf


def make_gateswa(out: str, window: int, pattern: str, seed: int = 3) -> None:
    """A random GateSWA checkpoint as the exporter writes it: Qwen3 config + gate/window/sinks/
    layer types, auto_map, and the shipped configuration/modeling files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_attnedit.families import config_for_preset

    code = os.path.join(ROOT, "megatron_attnedit", "targets", "gate_swa", "hf")
    os.makedirs(out)
    for f in ("configuration_gateswa.py", "modeling_gateswa.py"):
        shutil.copy(os.path.join(code, f), out)
    cfg = dict(config_for_preset("qwen3-debug"), model_type="qwen3_gateswa", architectures=["GateSWAForCausalLM"],
               auto_map={"AutoConfig": "configuration_gateswa.GateSWAConfig", "AutoModelForCausalLM": "modeling_gateswa.GateSWAForCausalLM"},
               use_sliding_window=True, sliding_window=window, output_gate="head", attention_sinks=True,
               layer_types=["sliding_attention" if k == "S" else "full_attention" for k in pattern])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True), trust_remote_code=True).save_pretrained(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher (qwen3-debug + SentencePiece tokenizer), a Qwen3 student, an MLA (DeepSeek-V3)
    student, held-out data made by preprocess_data.py, and stage-1/stage-2 metrics files."""
    from test_eval_mla import make_deepseek

    base = tmp_path_factory.mktemp("eval")
    corpus = training_data.make_corpus(str(base / "data"), n_docs=40)
    d = {k: str(base / k) for k in ("teacher", "student", "mla")}
    make_tiny_hf(d["teacher"], "qwen3-debug", seed=1)
    make_tiny_hf(d["student"], "qwen3-debug", seed=2)
    shutil.copy(corpus["tokenizer"], os.path.join(d["teacher"], "tokenizer.model"))
    mla = make_deepseek(3, kv_lora_rank=32, n_routed_experts=2, num_experts_per_tok=1)
    mla.save_pretrained(d["mla"])
    d["gateswa"] = str(base / "gateswa")
    make_gateswa(d["gateswa"], window=32, pattern="SSSF")
    runs = base / "runs" / "tiny_mla"
    for stage, rows in (
        ("stage1", [{"iteration": i, "loss": 1 / i, **{f"stage1/layer_{l:02d}": (l + 1) / i for l in range(4)}} for i in range(1, 6)]),
        # validation metrics are separate records at the same iteration, as the loop logs them
        ("stage2", [r for i in range(1, 6) for r in [{"iteration": i, "loss": 2 / i, "stage2/kl": 2 / i}] + [{"iteration": i, "val_loss": 2.5 / i}] * (i % 2 == 0)]),
    ):
        os.makedirs(runs / stage)
        (runs / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dict(d, base=str(base), prefix=corpus["prefix"], tokenizer=corpus["tokenizer"], runs=str(runs))


def _err(capsys, argv):
    capsys.readouterr()  # drop earlier output (e.g. preprocess_data's progress)
    rc = evaluate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def test_windows_score_every_token_once():
    for stride in (16, 7, 1):
        wins = perplexity.make_windows(100, 16, stride)
        scored = [b + j + 1 for b, first in wins for j in range(first, 16)]
        assert scored == list(range(1, scored[-1] + 1)) and scored[-1] > 100 - stride - 1
    assert sum(16 - f for _, f in perplexity.make_windows(1000, 16, 8, max_tokens=40)) == 40


def test_perplexity_equals_exp_mean_ce(setup):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["teacher"]).eval()
    tokens = np.random.default_rng(0).integers(0, 256, 200)
    wins = perplexity.make_windows(len(tokens), 32, 32)
    got = perplexity.perplexity(lambda ids: model(ids).logits, tokens, wins, 32, batch_size=3)
    with torch.no_grad():
        x = torch.from_numpy(tokens[: len(wins) * 32 + 1])
        inputs = torch.stack([x[i * 32 : i * 32 + 32] for i in range(len(wins))])
        targets = torch.stack([x[i * 32 + 1 : i * 32 + 33] for i in range(len(wins))])
        ce = torch.nn.functional.cross_entropy(model(inputs).logits.reshape(-1, 256), targets.reshape(-1))
    assert got["scored_tokens"] == len(wins) * 32 == 192
    assert abs(got["ppl"] - math.exp(float(ce))) < 1e-4 * got["ppl"]


def test_text_files_give_the_dataset_tokens(setup, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "checkpoints_tools"))
    import preprocess_data

    files = []
    for i in range(3):
        files.append(str(tmp_path / f"doc{i}.txt"))
        open(files[-1], "w").write(training_data.document(__import__("random").Random(i)))
    preprocess_data.main(["--input", str(tmp_path / "doc*.txt"), "--tokenizer-dir", setup["teacher"], "--output-prefix", str(tmp_path / "ds")])
    a = perplexity.load_eval_tokens(files, setup["teacher"], 256)
    b = perplexity.load_eval_tokens([str(tmp_path / "ds")], setup["teacher"], 256)
    assert np.array_equal(a["tokens"], b["tokens"]) and "tokenizer files (SHA-256)" in b["checks"]


def test_report(setup):
    out = os.path.join(setup["base"], "report")
    argv = ["--teacher", setup["teacher"], "--student", setup["student"], "--student", f"mla={setup['mla']}",
            "--student", setup["gateswa"], "--data", setup["prefix"],
            "--report-dir", out, "--run-dir", setup["runs"], "--max-tokens", "256", "--seq-length", "64", "--prompt-tokens", "8",
            "--decode-tokens", "8", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    for f in ("report.md", "results.json", "kv_vs_context.png", "stage1_curves.png", "stage2_curves.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert not [f for f in os.listdir(out) if f.startswith(".staging")]
    res = json.load(open(os.path.join(out, "results.json")))
    md = open(os.path.join(out, "report.md")).read()
    teacher, student, mla, gateswa = res["models"]
    assert res["data"]["scored_tokens"] == 256 == teacher["scored_tokens"] == mla["scored_tokens"]
    assert teacher["ppl_ratio"] == 1.0 and student["ppl_ratio"] == pytest.approx(student["ppl"] / teacher["ppl"])
    assert teacher["kv"]["measured_bytes_per_token"] == teacher["kv"]["config_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
    assert mla["kv"]["measured_bytes_per_token"] == mla["kv"]["config_bytes_per_token"] == 4 * (32 + 8) * 4
    assert gateswa["remote_code"] and gateswa["kv"]["attention"] == "gate_swa" and gateswa["model_type"] == "qwen3_gateswa"
    assert gateswa["kv"]["measured_bytes_per_token"] == gateswa["kv"]["config_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
    assert gateswa["kv"]["per_context_bytes"]["4096"] == (3 * 32 + 4096) * 2 * 2 * 16 * 4  # S layers hold 32 tokens
    for m in res["models"]:  # every model decoded by the engine, checked against the stock forward; cache = formula per layer
        assert m["decode_check"]["ok"] and m["decode_check"]["tokens_equal"] and m["decode_check"]["steps"] == 9, m["decode_check"]
        assert m["kv"]["measured_equals_config"] and m["kv"]["positions"] == 16
    assert mla["decode"]["path"] == "engine, mla cache" and gateswa["decode"]["path"] == "engine, gate_swa cache"
    assert "| mla | engine, mla cache | 9 |" in md and "(GateSWA W=32 SSSF; every layer equals the formula)" in md
    summary = md.split("## Summary")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(" *"): [c.strip() for c in line.split("|")[2:-1]] for line in summary.splitlines() if line.startswith("| ")}
    for m in res["models"]:
        row = rows[m["name"]]
        assert row[1] == f"{m['ppl']:.3f}" and row[2] == f"{m['ppl_ratio']:.4f}"
        assert row[3] == f"{m['kv']['config_bytes_per_token']:.1f}" and row[4] == f"{m['kv']['measured_bytes_per_token']:.1f}"
        assert row[8].startswith(f"{m['decode']['tokens_per_s']:.1f}")
    assert rows["mla"][5] == "2.50 MiB (62.5%)"  # 4 layers x (32 + 8) x 4 B = 640 B/token, x 4096 tokens; teacher 1024
    assert "tiny_mla/stage1 (stage1, metrics.jsonl)" in md and "![Stage 2](stage2_curves.png)" in md
    # loss by position: the same scored tokens for every model, each in one bucket; GateSWA's window an edge
    bp = res["by_position"]
    assert bp["windows"] == {"gateswa": 32} and bp["edges"] == [1, 2, 4, 8, 16, 32, 64]
    for m in res["models"]:
        rows_m = bp["models"][m["name"]]
        assert sum(r["tokens"] for r in rows_m) == m["scored_tokens"]
        assert sum(r["tokens"] * r["mean_nll"] for r in rows_m) / m["scored_tokens"] == pytest.approx(m["mean_nll"], rel=1e-12)
    beyond = bp["beyond_window"]["gateswa"]
    assert beyond["tokens"] == 4 * 32 and set(bp["beyond_window"]) == {"gateswa"}
    assert beyond["ratio"] == pytest.approx(beyond["student_nll"] / beyond["teacher_nll"])
    assert os.path.getsize(os.path.join(out, "loss_by_position.png")) > 0
    assert "## Loss by position in the window" in md and "| 17-32 ← W (gateswa) | 64 |" in md
    students = md.split("## Students against the teacher")[1].split("\n## ")[0]
    assert f"| gateswa | GateSWA W=32 SSSF | {gateswa['ppl_ratio']:.4f} |" in students
    assert f"W=32: {beyond['student_nll']:.3f} / {beyond['teacher_nll']:.3f}" in students
    # the fixture's tokenizer has no digits: the probe, not asked for, is skipped and the report says why
    assert "retrieval probe not run: the teacher's tokenizer does not reproduce the probe's key line" in md
    assert "goal" not in md.lower()


def test_lengths_beyond_max_position_embeddings(setup, capsys, tmp_path):
    """Issue 15: a window or probe context longer than a model's max_position_embeddings is refused
    in one line before anything is written, or evaluated with --allow-longer-than-trained and one
    warning line."""
    short = str(tmp_path / "short")
    make_tiny_hf(short, "qwen3-debug", seed=2, max_position_embeddings=96)
    report_dir = tmp_path / "r"
    base = ["--teacher", setup["teacher"], "--data", setup["prefix"], "--report-dir", str(report_dir), "--device", "cpu"]
    err = _err(capsys, base + ["--seq-length", "600"])
    assert "--seq-length 600 is longer than the teacher's max_position_embeddings 512" in err and "--allow-longer-than-trained" in err
    err = _err(capsys, base + ["--seq-length", "128", "--student", f"short={short}"])
    assert "--seq-length 128 is longer than student short's max_position_embeddings 96" in err
    err = _err(capsys, base + ["--seq-length", "64", "--probe-context", "1024", "--probe-trials", "1"])
    assert "--probe-context 1024 is longer than the teacher's max_position_embeddings 512" in err
    assert not report_dir.exists()
    rc = evaluate.main(base + ["--seq-length", "520", "--max-tokens", "520", "--probe-trials", "0", "--decode-tokens", "2",
                               "--allow-longer-than-trained"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and err == ["warning: --seq-length 520 is longer than the teacher's max_position_embeddings 512; evaluated anyway "
                               "(--allow-longer-than-trained): figures past 512 tokens are out of its range"], err
    res = json.load(open(report_dir / "results.json"))
    assert res["data"]["seq_len"] == 520 and res["models"][0]["scored_tokens"] == 520 and err[0][len("warning: "):] in res["notes"]


def test_bad_inputs(setup, capsys, tmp_path):
    base = ["--teacher", setup["teacher"], "--report-dir", str(tmp_path / "r"), "--device", "cpu"]
    # a dataset made with another tokenizer: caught by meta.json (vocab), by the tokenizer files, by the ids
    other = training_data.train_tokenizer(str(tmp_path / "tok200"), vocab_size=200, seed=5)
    same_size = training_data.train_tokenizer(str(tmp_path / "tok120"), vocab_size=120, seed=7)
    sys.path.insert(0, os.path.join(ROOT, "checkpoints_tools"))
    import preprocess_data

    jsonl = str(tmp_path / "c.jsonl")
    training_data.write_jsonl(jsonl, 20, seed=3)
    for name, tok in (("big", other), ("same", same_size)):
        preprocess_data.main(["--input", jsonl, "--tokenizer-dir", tok, "--output-prefix", str(tmp_path / name)])
    assert "made with a different tokenizer (vocab 200" in _err(capsys, base + ["--data", str(tmp_path / "big")])
    # same vocabulary size and eod, other pieces: the tokenizer files tell
    assert "vocabulary files differ from the teacher's" in _err(capsys, base + ["--data", str(tmp_path / "same")])
    os.remove(str(tmp_path / "big.meta.json"))  # no record left: the ids give it away
    assert "out of range of the teacher's vocabulary (120 ids)" in _err(capsys, base + ["--data", str(tmp_path / "big")])
    # teacher/student vocabulary mismatch; a student with another tokenizer
    make_tiny_hf(str(tmp_path / "v128"), "qwen3-debug", vocab_size=128)
    assert "has vocab_size 128 but the teacher 256" in _err(capsys, base + ["--data", setup["prefix"], "--student", str(tmp_path / "v128")])
    make_tiny_hf(str(tmp_path / "othertok"), "qwen3-debug")
    shutil.copy(other, str(tmp_path / "othertok" / "tokenizer.model"))
    assert "ships a tokenizer" in _err(capsys, base + ["--data", setup["prefix"], "--student", str(tmp_path / "othertok")])
    # a run dir without metrics; a missing teacher
    assert "holds no training metrics" in _err(capsys, base + ["--data", setup["prefix"], "--run-dir", str(tmp_path)])
    assert "is not a Hugging Face model directory" in _err(capsys, ["--teacher", str(tmp_path), "--data", "x", "--report-dir", str(tmp_path)])


def test_same_tokenizer(setup, tmp_path):
    """Compared on the first kind of vocabulary file both sides hold."""
    both = tmp_path / "both"
    os.makedirs(both)
    shutil.copy(setup["tokenizer"], both / "tokenizer.model")
    (both / "tokenizer.json").write_text("{}")
    (both / "tokenizer_config.json").write_text('{"cosmetic": 1}')
    assert perplexity.same_tokenizer(str(both), setup["tokenizer"]) is True  # a dir and the .model file it was made from
    assert perplexity.same_tokenizer(str(both), setup["teacher"]) is True
    other = training_data.train_tokenizer(str(tmp_path / "other"), vocab_size=120, seed=9)
    assert perplexity.same_tokenizer(other, setup["teacher"]) is False
    only_json = tmp_path / "json"
    os.makedirs(only_json)
    (only_json / "tokenizer.json").write_text("{}")
    assert perplexity.same_tokenizer(str(only_json), setup["teacher"]) is None  # nothing in common to compare


def test_report_dir_not_writable(setup, tmp_path):
    """Through the real CLI: exit code 2, one line, nothing loaded."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cmd = [sys.executable, "-m", "megatron_attnedit.evaluate", "--teacher", setup["teacher"], "--data", setup["prefix"],
           "--report-dir", str(blocker / "report")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "is not writable" in lines[0], p.stderr
    with pytest.raises(EvalError, match="not writable"):
        from megatron_attnedit.eval import report

        report.staging_dir(str(blocker / "report"))


def test_training_curves(setup, tmp_path):
    """metrics.jsonl (records of one iteration merged), else a W&B offline run."""
    import wandb

    from megatron_attnedit.eval import plots

    runs = {r.label: r for r in plots.find_runs(setup["runs"])}
    assert runs["tiny_mla/stage1"].stage == "stage1" and runs["tiny_mla/stage2"].stage == "stage2"
    assert runs["tiny_mla/stage2"].rows[2] == {"loss": 1.0, "stage2/kl": 1.0, "val_loss": 1.25}
    run = wandb.init(project="t", mode="offline", dir=str(tmp_path), settings=wandb.Settings(console="off", silent=True))
    for i in range(1, 4):
        run.log({"loss": 1 / i, "stage1/layer_00": 1 / i, "stage1/layer_01": 2 / i}, step=i)
    run.finish()
    wandb.teardown()  # the service may still be writing the run file after finish(); in the full suite it sometimes was
    (wb,) = plots.find_runs(str(tmp_path), "wb")
    assert wb.source == "wandb" and wb.stage == "stage1" and wb.series("stage1/layer_01") == ([1, 2, 3], [2, 1, 2 / 3])
    plots.plot_stage1([wb, runs["tiny_mla/stage1"]], str(tmp_path / "s1.png"))
    assert os.path.getsize(tmp_path / "s1.png") > 0


def test_wrong_decode_fails_the_evaluation(setup, tmp_path, monkeypatch, capsys):
    """An engine whose MLA value up-projection is 5% off: the report is written, its decode check says
    FAIL, and the command exits 1 with one error line naming the model."""
    from megatron_attnedit.targets.mla import decode as mla

    allocate = mla.MLAAttention.allocate

    def broken(self, *args):
        allocate(self, *args)
        self.w_uv = self.w_uv * 1.05

    monkeypatch.setattr(mla.MLAAttention, "allocate", broken)
    out = str(tmp_path / "report")
    argv = ["--teacher", setup["teacher"], "--student", f"mla={setup['mla']}", "--data", setup["prefix"], "--report-dir", out,
            "--max-tokens", "64", "--seq-length", "32", "--prompt-tokens", "8", "--decode-tokens", "4", "--device", "cpu", "--probe-trials", "0"]
    capsys.readouterr()
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the decode engine's logits for mla differ from the stock forward" in err[-1], err
    res = json.load(open(os.path.join(out, "results.json")))
    assert [m["decode_check"]["ok"] for m in res["models"]] == [True, False]
    assert "| mla | engine, mla cache | 5 |" in open(os.path.join(out, "report.md")).read()
