"""``train`` under bad input and faults (issue 15, training half):

* every row of tests/bad_inputs_train.py (damaged checkpoints, a resume or a start from weights
  that do not fit the run, lengths and data the model cannot take, a full disk while saving) ends
  in exit code 2 (bad input) or 1 (a fault during the run), one ``error:`` line as stderr's last
  line, no traceback, rank 1 silent with the same code, and the checkpoint directory unchanged;
* a damaged newest checkpoint is passed over in one line and the run resumes exactly from the
  previous one; checkpoints without a manifest (written before it) resume silently; a run killed
  at any step of a save resumes from the previous checkpoint and cleans up;
* under torchrun, a user error is one line (no per-rank tracebacks), and the advice of the TP
  refusal (a new run from the weights) works;
* a sequence longer than the model's max_position_embeddings trains only when asked, with a warning;
* the manifest tells a complete iteration directory from a truncated or altered one.
"""

import os
import shutil
import subprocess
import sys

import pytest

import bad_inputs_train as bad
from conftest import ROOT, torchrun
from megatron_attnedit.training import manifest
from megatron_attnedit.training.monitor import read_metrics

ENV = bad.ENV


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return bad.prepare_workspace(str(tmp_path_factory.mktemp("reliability_train")))


@pytest.fixture(scope="module")
def table(ws, tmp_path_factory):
    return bad.run_cases(bad.CASES, ws, str(tmp_path_factory.mktemp("cases")))


def test_the_table_has_the_promised_kinds():
    names = {c.name for c in bad.CASES}
    assert len(names) == len(bad.CASES) >= 20
    assert {c.exit_code for c in bad.CASES} == {1, 2} and any(c.nproc > 1 for c in bad.CASES)


@pytest.mark.parametrize("case", bad.CASES, ids=lambda c: c.name)
def test_bad_input(table, case):
    result = table[case.name]
    if result["ranks"] is None:
        pytest.skip("no tmpfs: unprivileged user and mount namespaces (unshare -rm) are not allowed here")
    found = bad.problems(case, result)
    assert not found, f"{case.name} ({case.how}): {found}\n{result['command']}\n{result['ranks'][0]['stderr'][-3000:]}"


def _run(args):
    return subprocess.run([sys.executable, "-m", "megatron_attnedit.train", *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=600)


def _losses(run_dir):
    m = read_metrics(str(run_dir))
    return {i: m[i]["loss"] for i in m}


def test_resume_passes_over_a_damaged_checkpoint_in_one_line(ws, tmp_path):
    """A .distcp of the newest checkpoint cut short: the run resumes from iteration 3 with the
    same losses as the uninterrupted run, says so in one line, and saves a complete iteration 6."""
    run = tmp_path / "run"
    shutil.copytree(ws.trained, run)
    shard = bad.largest_shard(str(run / "checkpoints" / "iter_0000006"))
    bad.truncate(str(run / "checkpoints" / "iter_0000006" / shard), 100_000)
    os.remove(run / "metrics.jsonl")  # only the resumed steps' losses from here on
    proc = _run(bad.train_args(ws, str(run), "training.train_iters=6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [x for x in proc.stderr.splitlines() if "skipped" in x]
    assert len(notes) == 1 and notes[0].startswith(f"warning: skipped iter_0000006: {shard} is 100,000 bytes where"), proc.stderr
    assert "resuming from" in notes[0] and notes[0].endswith("iter_0000003, the newest complete checkpoint")
    assert "resumed at iteration 3/6" in proc.stdout
    ref, got = _losses(ws.trained), _losses(run)
    assert sorted(got) == [4, 5, 6] and [got[i] for i in (4, 5, 6)] == [ref[i] for i in (4, 5, 6)]
    assert manifest.problem(str(run / "checkpoints" / "iter_0000006")) is None


def test_checkpoints_without_a_manifest_resume_as_before(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws.trained, run)
    for it in ("iter_0000003", "iter_0000006"):
        os.remove(run / "checkpoints" / it / manifest.MANIFEST)
    proc = _run(bad.train_args(ws, str(run), "training.train_iters=6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at iteration 6/6" in proc.stdout and "skipped" not in proc.stderr and "warning" not in proc.stderr


def test_a_save_killed_at_any_step_resumes_from_the_previous_checkpoint(ws, tmp_path):
    """What a kill leaves at each step of a save, all at once: shards of iteration 9 half written
    (iter_0000009.tmp without metadata or manifest), iteration 6 renamed but the latest file not yet
    replaced (latest = 3, its replacement written beside it). The run resumes from 3, follows the
    uninterrupted run, rewrites 6 and leaves nothing temporary."""
    run = tmp_path / "run"
    shutil.copytree(ws.trained, run)
    c = run / "checkpoints"
    shutil.copytree(c / "iter_0000006", c / "iter_0000009.tmp")
    for name in ("metadata.json", manifest.MANIFEST, "config.yaml"):
        os.remove(c / "iter_0000009.tmp" / name)
    bad.truncate(str(c / "iter_0000009.tmp" / bad.largest_shard(str(c / "iter_0000009.tmp"))), 4096)
    (c / bad.LATEST).write_text("3")
    (c / (bad.LATEST + ".tmp")).write_text("6")
    os.remove(run / "metrics.jsonl")
    proc = _run(bad.train_args(ws, str(run), "training.train_iters=6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at iteration 3/6" in proc.stdout
    ref, got = _losses(ws.trained), _losses(run)
    assert sorted(got) == [4, 5, 6] and [got[i] for i in (4, 5, 6)] == [ref[i] for i in (4, 5, 6)]
    assert sorted(os.listdir(c)) == ["iter_0000003", "iter_0000006", bad.LATEST] and (c / bad.LATEST).read_text() == "6"
    assert manifest.problem(str(c / "iter_0000006")) is None


def test_torchrun_user_error_is_one_line_and_the_advice_works(ws, tmp_path):
    """Resuming the TP=1 run at TP=2 under torchrun: one error line from rank 0 and no per-rank
    traceback (torchrun adds its own report of the failed workers after it); then the way out it
    names, a new run from the checkpoint's weights at TP=2, trains."""
    run = tmp_path / "run"
    shutil.copytree(ws.trained, run)
    before = bad.snapshot(str(run / "checkpoints"))
    proc = torchrun("train_worker.py",
                    *bad.train_args(ws, str(run), "training.train_iters=9", "parallel.tensor_model_parallel_size=2"), check=False)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "TP=2" in errors[0], proc.stderr[-3000:]
    assert "[rank" not in proc.stderr and os.path.join(ROOT, "megatron_attnedit") not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the worker's own code, in torchrun's report
    assert bad.snapshot(str(run / "checkpoints")) == before
    advice = errors[0].split("checkpoint.pretrained_checkpoint=")[1].split(" ")[0]
    torchrun("train_worker.py",
             *bad.train_args(ws, str(tmp_path / "new"), "training.train_iters=3", "parallel.tensor_model_parallel_size=2",
                             f"checkpoint.pretrained_checkpoint={advice}"))
    first = _losses(tmp_path / "new")[1]
    assert abs(first - _losses(ws.trained)[6]) < 0.5 < abs(first - _losses(ws.trained)[1])  # starts from the trained weights


def test_longer_than_trained_only_when_asked(ws, tmp_path):
    proc = _run(bad.train_args(ws, str(tmp_path / "run"), "training.train_iters=3", "data.seq_length=600",
                               "data.allow_longer_than_trained=true", "checkpoint.save_interval=0", "data.global_batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "data.seq_length=600 is longer than the model's max_position_embeddings=512" in warnings[0]
    assert sorted(read_metrics(str(tmp_path / "run"))) == [1, 2, 3]


def _iteration_dir(path):
    os.makedirs(os.path.join(path, "sub"))
    open(os.path.join(path, "metadata.json"), "w").write('{"sharded_backend": "torch_dist"}')
    open(os.path.join(path, "common.pt"), "wb").write(bytes(range(256)) * 10)
    open(os.path.join(path, "sub", "config.json"), "w").write("{}")
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:  # larger than FULL_CRC_BYTES: edges checked
        f.write(os.urandom(manifest.FULL_CRC_BYTES + 3 * manifest.EDGE_BYTES))
    manifest.write(path, 7)


def test_manifest_tells_complete_from_damaged(tmp_path):
    d = str(tmp_path / "iter_0000007")
    _iteration_dir(d)
    assert manifest.problem(d) is None
    big = os.path.join(d, "__0_0.distcp")
    size = os.path.getsize(big)
    bad.truncate(big, size - 1)
    assert "__0_0.distcp is " in manifest.problem(d) and "(truncated or damaged)" in manifest.problem(d)
    with open(big, "ab") as f:
        f.write(b"\0")  # right size again, last byte changed (unless it was 0)
    with open(big, "r+b") as f:
        f.seek(size - 1)
        f.write(b"\x01")
    assert manifest.problem(d) == "__0_0.distcp does not match its checksum (damaged)"
    shutil.rmtree(d)
    _iteration_dir(d)
    bad.flip_bytes(os.path.join(d, "common.pt"))
    assert manifest.problem(d) == "common.pt does not match its checksum (damaged)"
    shutil.rmtree(d)
    _iteration_dir(d)
    os.remove(os.path.join(d, "sub", "config.json"))
    assert manifest.problem(d) == "sub/config.json is missing"
    os.remove(os.path.join(d, manifest.MANIFEST))
    assert manifest.problem(d) is None  # as before manifests: metadata.json is enough
    os.remove(os.path.join(d, "metadata.json"))
    assert "no metadata.json" in manifest.problem(d)
