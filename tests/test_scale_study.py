"""The scale study (launch/scale_study.sh): the package corpus, the plan's constraints, and the whole
study at toy size on the CPU (``--tiny``: 3 MB of installed packages' sources, a 1.9M-parameter
teacher trained 32 steps, MLA / GateSWA / MLA-without-stage-1 at 8 steps per stage, evaluate).

The tiny run's checks read the files each phase leaves and the numbers in them: the corpus record
(packages with the versions importlib.metadata reports, token counts that add up to the datasets'),
the teacher's loss falling, every model's finite perplexity, the KV fractions evaluate measured,
every stage's loss curve from step 1. Whether a stage's loss falls is not checked here: at this size
the teacher is barely past unigram statistics, the students start within ~0.02 (stage 1 NMSE) and
~1e-4 nats (stage 2 KL) of it, and 8 steps moved those up in one run and down in another (stage 1
of the MLA student: 0.015 -> 0.022, of GateSWA 0.038 -> 0.030) -- the GPU run is where the stages
are judged. About 3-4 minutes on 2 idle cores.
"""

import hashlib
import importlib.metadata as md
import json
import math
import os
import re
import subprocess
import sys

import pytest

from megatron_attnedit import teacher
from megatron_attnedit.data import packages, recall
from megatron_attnedit.scale_study import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_corpus_is_deduplicated_split_by_content_and_recorded(tmp_path):
    m = packages.build_package_corpus(str(tmp_path / "a"), max_bytes=400_000, valid_fraction=0.2)
    names = [p["name"] for p in m["packages"]]
    assert names and not any(packages._norm_name(n) in packages.EXCLUDED_DISTRIBUTIONS for n in names)
    for p in m["packages"]:
        assert p["version"] == md.version(p["name"]), p
    seen = set()
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in open(tmp_path / "a" / f"{split}.jsonl", encoding="utf-8")]
        assert len(rows) == m["splits"][split]["files"] > 0
        for r in rows:
            digest = hashlib.sha256(r["text"].encode("utf-8")).digest()
            assert digest not in seen, r["path"]  # no text twice, on either side
            seen.add(digest)
            assert packages.split_of_content(digest, 0.2) == split
            assert r["path"].startswith(r["package"] + "/") and "megatron_attnedit/" not in r["path"]
    assert sum(p["train_files"] + p["valid_files"] for p in m["packages"]) == len(seen)
    again = packages.build_package_corpus(str(tmp_path / "b"), max_bytes=400_000, valid_fraction=0.2)
    assert again["splits"] == m["splits"]  # deterministic: same files, same bytes, same hashes


DRILL = re.compile(r'^KEY_[0-9]{4} = "[0-9]{5}"\n', re.M)


def test_recall_drills_repeat_a_key_line_in_training_files_only(tmp_path):
    """Drilled training files are the original file plus key lines each stated exactly twice; held-out
    files are untouched; the same corpus comes out twice; the share drilled follows recall_share."""
    plain = packages.build_package_corpus(str(tmp_path / "plain"), max_bytes=400_000, valid_fraction=0.2)
    m = packages.build_package_corpus(str(tmp_path / "a"), max_bytes=400_000, valid_fraction=0.2, recall_share=0.5)
    read = lambda d, s: [json.loads(line) for line in open(tmp_path / d / f"{s}.jsonl", encoding="utf-8")]  # noqa: E731
    assert read("a", "valid") == read("plain", "valid")  # held-out files are never drilled
    drilled, drills = 0, 0
    for before, after in zip(read("plain", "train"), read("a", "train"), strict=True):
        assert before["path"] == after["path"]
        lines = DRILL.findall(after["text"])
        if not lines:
            assert after["text"] == before["text"]
            continue
        drilled += 1
        drills += len(lines) // 2
        original = before["text"] if before["text"].endswith("\n") else before["text"] + "\n"
        assert DRILL.sub("", after["text"]) == original  # nothing else changed
        counts = {line: lines.count(line) for line in lines}
        assert set(counts.values()) == {2}, counts  # each key line stated, then repeated once
        names = [line.split(" = ")[0] for line in counts]
        assert len(set(names)) == len(names)  # one value per name within a file
        digest = hashlib.sha256(before["text"].encode("utf-8")).digest()
        assert recall.is_drilled(digest, 0.5) and packages.split_of_content(digest, 0.2) == "train"
    n_train = m["splits"]["train"]["files"]
    assert m["recall_drills"]["files"] == drilled and m["recall_drills"]["drills"] == drills
    assert 0.3 * n_train < drilled < 0.7 * n_train, (drilled, n_train)
    assert plain["recall_drills"]["files"] == 0
    again = packages.build_package_corpus(str(tmp_path / "b"), max_bytes=400_000, valid_fraction=0.2, recall_share=0.5)
    assert again["splits"] == m["splits"] and read("b", "train") == read("a", "train")


def test_recall_drill_gaps_reach_across_the_file():
    """Log-uniform gaps: about as many drills span a tenth of a 2000-line file or more as span 10 lines or fewer."""
    text = "".join(f"x{i} = {i}\n" for i in range(2000))
    gaps = []
    for k in range(20):
        out, n = recall.drill(text, hashlib.sha256(str(k).encode()).digest())
        assert n == 2000 // recall.LINES_PER_DRILL
        at: dict = {}
        for i, line in enumerate(out.splitlines()):
            if line.startswith("KEY_"):
                at.setdefault(line, []).append(i)
        gaps += [b - a for a, b in at.values()]
    short, far = sum(g <= 11 for g in gaps), sum(g >= 200 for g in gaps)
    assert far > 0.15 * len(gaps) and short > 0.15 * len(gaps), (short, far, len(gaps))


@pytest.mark.skipif(teacher.bundled_teacher("dense") is None, reason="the study uses the bundled teacher's tokenizer")
def test_datasets_with_tokenizer_processes_equal_one_process(tmp_path, monkeypatch):
    """The GPU run tokenizes with 16 processes (spawned: they import preprocess_data by name)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_attnedit.scale_study import study

    monkeypatch.setattr(teacher, "POOL_MIN_BYTES", 0)  # a pool for every split, however small
    packages.build_package_corpus(str(tmp_path / "corpus"), max_bytes=300_000, valid_fraction=0.3)
    tok = study.prepare_tokenizer(str(tmp_path / "tok"))
    one = teacher.prepare_datasets(str(tmp_path / "corpus"), tok, str(tmp_path / "one"), workers=1)
    two = teacher.prepare_datasets(str(tmp_path / "corpus"), tok, str(tmp_path / "two"), workers=2)
    assert one["tokens"] == two["tokens"] and one["split"] == two["split"]
    a, b = (IndexedDataset(x["prefixes"]["train_valid"], mmap=True) for x in (one, two))
    assert len(a) == len(b) > 0 and all((a[i] == b[i]).all() for i in range(len(a)))


def test_gpu_plan_meets_the_issue_constraints():
    sizes = plan.gpu_sizes()
    a = sizes.arch
    assert 60e6 <= plan.param_count(a) <= 150e6
    assert a["num_attention_heads"] // a["num_key_value_heads"] >= 2 and sizes.seq == 4096
    mla, gswa = plan.recipe("mla")["target"]["options"], plan.recipe("gateswa")["target"]["options"]
    kv = plan.kv_fractions(a, mla, gswa, 4096)
    assert kv["mla"] <= 0.28 and kv["gateswa"] <= 0.30 and gswa["window"] == 512
    kinds = [gswa["pattern"][i % len(gswa["pattern"])] for i in range(a["num_hidden_layers"])]
    assert 1 <= kinds.count("F") <= a["num_hidden_layers"] // 4
    # HF's own count of the teacher it writes agrees with the plan's formula
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", vocab_size=4096, tie_word_embeddings=False, **a)
    with __import__("torch").device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert n == plan.param_count(a)
    assert plan.estimate(sizes)["total"] <= 540


@pytest.mark.skipif(teacher.bundled_teacher("dense") is None, reason="the study uses the bundled teacher's tokenizer")
def test_tiny_study(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "scale_study.sh"), "--tiny", "--jobs", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in ("data", "teacher_train", "teacher_export", "mla_stage1", "mla_stage2", "gateswa_stage1", "gateswa_stage2",
                  "mla_no_stage1_stage2", "mla_no_stage1_export", "evaluate"):
        assert f"] {phase} done in " in proc.stdout, phase
    for rel in ("corpus/manifest.json", "datasets/train_valid.idx", "teacher/metrics.jsonl", "hf/teacher/config.json",
                "mla/stage1/metrics.jsonl", "gateswa/stage2/metrics.jsonl", "mla/stage2_no_stage1/metrics.jsonl",
                "report/results.json", "study.md", "study_curves.png"):
        assert (out / rel).is_file(), rel
    s = json.loads((out / "study.json").read_text())

    c = s["corpus"]
    assert 0 < c["recall_drills"]["files"] < c["splits"]["train"]["files"] and c["recall_drills"]["drills"] >= c["recall_drills"]["files"]
    assert "Recall drills" in (out / "study.md").read_text()
    assert c["packages"] and all(p["version"] == md.version(p["name"]) for p in c["packages"])
    info = json.loads((out / "datasets" / "datasets.json").read_text())
    for split in ("train", "valid"):
        assert sum(p[f"{split}_tokens"] for p in c["packages"]) == c["splits"][split]["tokens"] == info["tokens"][split] > 0

    t, planned = s["teacher"], plan.steps(plan.tiny_sizes())
    assert t["steps"] == planned["teacher"]["steps"] and t["tokens_seen"] == planned["teacher"]["tokens"]
    assert t["loss"]["end"] < t["loss"]["start"] - 0.5  # from ~ln(4096) = 8.3 nats: it learned something
    assert math.isfinite(t["ppl"]) and t["ppl"] < 4096

    assert set(s["students"]) == {"mla", "gateswa", "mla_no_stage1"}
    for name, m in s["students"].items():
        assert math.isfinite(m["ppl"]) and 0.8 < m["ppl_ratio"] < 5.0, (name, m["ppl_ratio"])
        assert 0.0 < m["kv_measured_fraction"] < 0.5, (name, m["kv_measured_fraction"])  # 25% MLA, 27% GateSWA at 256
        assert m["kv_measured_fraction"] == pytest.approx(m["kv_formula_fraction"], rel=0.05), name
        st = m["stages"]
        assert ("stage1" in st) == m["with_stage1"]
        assert st["stage2"]["loss"]["steps"] == planned[f"{m['target']}_stage2"]["steps"] and math.isfinite(st["stage2"]["loss"]["end"])
        if m["with_stage1"]:  # every step logged: the start is step 1 (the initialised student), a curve of all steps
            s1 = st["stage1"]
            assert s1["loss"]["start_iteration"] == 1 and len(s1["loss"]["curve"]) == planned[f"{m['target']}_stage1"]["steps"]
            assert len(s1["layers"]) == 6 and all(math.isfinite(v["start"]) and math.isfinite(v["end"]) for v in s1["layers"].values())
    for name in ("teacher_train", "mla_stage1", "gateswa_stage2"):
        p = s["phases"][name]
        assert p["startup_s"] > 0 and p["train_s"] > 0 and p["wall_s"] >= p["startup_s"] + p["train_s"]
    assert "| mla_no_stage1 " in (out / "study.md").read_text()


def test_a_killed_study_takes_its_running_step_with_it(tmp_path):
    """The study killed by a time limit (SIGKILL: nothing forwards it) must not leave a training step
    running on the GPU: each step's process gets SIGTERM when the study goes (children.py)."""
    import signal
    import time

    import psutil

    pid_file = tmp_path / "step.pid"
    step = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    driver = ("import sys; from megatron_attnedit.scale_study.runner import Runner; "
              f"Runner({str(tmp_path)!r})('step', [sys.executable, '-c', {step!r}])")
    study = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert study.poll() is None and time.time() < deadline, "the step never started"
        time.sleep(0.2)
    step_proc = psutil.Process(int(pid_file.read_text()))
    study.send_signal(signal.SIGKILL)
    study.wait(timeout=30)
    try:
        step_proc.wait(timeout=30)
    except psutil.TimeoutExpired:
        step_proc.kill()
        pytest.fail("the step outlived the study")


def test_time_guard_shortens_the_stages_only_when_the_teacher_was_slow():
    from megatron_attnedit.scale_study.__main__ import guard_scale

    sizes = plan.gpu_sizes()
    planned = plan.estimate(sizes)
    after_teacher = planned["data"] + planned["teacher"]
    assert guard_scale(sizes, 540.0, after_teacher, planned["lm_tokens_per_s"]) == 1.0
    # the teacher at half the planned speed took longer, and the stages would too: they are cut so
    # that the conversions' estimate at that speed fits what is left
    slow = planned["lm_tokens_per_s"] / 2
    elapsed = after_teacher + planned["teacher"]
    scale = guard_scale(sizes, 540.0, elapsed, slow)
    assert 0.25 <= scale < 1.0
    est = plan.estimate(sizes, lm_tokens_per_s=slow)
    assert elapsed + est["conversions_fixed"] + scale * est["conversions_gpu"] + est["evaluate"] <= 540.0 or scale == 0.25
    assert guard_scale(sizes, None, 10_000.0, slow) == 1.0


def test_step_flags_reach_the_plan_and_the_runs():
    from megatron_attnedit.scale_study.__main__ import apply_iters, parse_args

    sizes = apply_iters(plan.gpu_sizes(), parse_args(["--teacher-iters", "300", "--stage1-iters", "240", "--stage2-iters", "60"]))
    st = plan.steps(sizes)
    assert st["teacher"]["steps"] == 300 and st["mla_stage1"]["steps"] == st["gateswa_stage1"]["steps"] == 240
    assert st["mla_stage2"]["steps"] == st["gateswa_stage2"]["steps"] == 60
    assert plan.estimate(sizes)["teacher"] < plan.estimate(plan.gpu_sizes())["teacher"]
    with pytest.raises(SystemExit):
        parse_args(["--stage1-iters", "0"])


def test_per_target_overrides_reach_only_that_target():
    from megatron_attnedit.scale_study.__main__ import apply_iters, parse_args

    a = parse_args(["--set-gateswa", "target.options.window=256", "data.global_batch_size=8", "--set-mla", "target.options.kv_lora_rank=96",
                    "--recall-share", "0"])
    sizes = apply_iters(plan.gpu_sizes(), a)
    assert sizes.target_sets["gateswa"][-2:] == ["target.options.window=256", "data.global_batch_size=8"]
    assert sizes.target_sets["mla"][-1:] == ["target.options.kv_lora_rank=96"] and sizes.recall_share == 0.0
    assert sizes.window == 256  # the summary's "beyond W" is measured against the student's window
    st = plan.steps(sizes)
    assert st["gateswa_stage1"]["gbs"] == st["gateswa_stage2"]["gbs"] == 8 and st["mla_stage1"]["gbs"] == 16
    with pytest.raises(SystemExit):
        parse_args(["--recall-share", "1.5"])
