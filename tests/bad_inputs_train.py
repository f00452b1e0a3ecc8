"""Bad inputs and faults of ``python -m megatron_attnedit.train``: one table, and what it takes to walk it.

Every row is a real mistake or fault: a damaged or missing file in a trained run's checkpoint
directory, a run that does not fit its checkpoint, data or a length the model cannot take, a disk
that fills up while saving. For each, the command must end with exit code ``exit_code`` (2: bad
input, found before the run starts; 1: a fault during the run), stderr's last line must be one
``error:`` line holding ``fragment`` and no traceback, and the case's checkpoint directory must be
byte-for-byte what it was before (nothing overwritten, nothing half-written left behind). Rows
with ``nproc`` 2 run one process per rank (torchrun's environment): rank 1 must exit with the same
code and print nothing of its own.

    ws = prepare_workspace(root)     # tiny teacher, data, a trained run (iter 3 and 6), ...
    results = run_cases(CASES, ws, root / "cases")
    for case in CASES: assert not problems(case, results[case.name]), ...

A row's ``make(ws, case_dir)`` damages or builds what the case needs under ``case_dir`` (which
starts as a copy of the trained run) and returns the command line's arguments;
``command_line(case, ws, case_dir)`` is the same as one shell command.

Which files a torch_dist save writes depends on the megatron-core version (0.16: ``__0_0.distcp``,
``__0_1.distcp`` and ``common.pt``; 0.17+: one ``__0_0.distcp`` holding the common state as a
record), so rows damage files chosen from what the save wrote (``largest_shard``, ``first_shard``,
``common_state``), and fragments name them as ``{shard}`` / ``{common}``, filled in from the trained
run's checkpoint (``Workspace.files``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import zlib
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
LATEST = "latest_checkpointed_iteration.txt"


@dataclasses.dataclass
class Workspace:
    root: str
    hf: str  # tiny Qwen3 teacher (HF files)
    corpus: dict  # training_data.make_corpus: tokenizer, prefix, prefix2
    trained: str  # run dir of 6 lm steps: checkpoints/iter_0000003, iter_0000006, latest = 6
    mla_stage1: str  # run dir of 3 MLA stage-1 steps (target mla)
    teacher_mcore: str  # hf_to_mcore.py output of the teacher (no target)
    short: str  # dataset prefix of one 7-token document
    files: Dict[str, str] = dataclasses.field(default_factory=dict)  # {shard}, {common} of the fragments: saved_files()


@dataclasses.dataclass
class Case:
    name: str
    how: str
    make: Callable[[Workspace, str], List[str]]
    exit_code: int
    fragment: str
    nproc: int = 1
    fsize_limit: Optional[int] = None  # RLIMIT_FSIZE for the case's processes (writes past it fail: EFBIG)
    tmpfs_bytes: Optional[int] = None  # checkpoints on a tmpfs of this size (unshare -rm; skipped where not allowed)

    def expected(self, ws: Workspace) -> str:
        """The fragment with the file names of this megatron-core's save filled in."""
        out = self.fragment
        for key, name in ws.files.items():
            out = out.replace("{" + key + "}", name)
        return out


def train_args(ws: Workspace, run: str, *extra: str, recipe: str = "tiny_lm", stage: Optional[str] = None) -> List[str]:
    args = ["--recipe", recipe] + (["--stage", stage] if stage else [])
    return args + ["--set", f"model.hf_dir={ws.hf}", "model.preset=null", f"data.data_path=[{ws.corpus['prefix']}]",
                   f"data.tokenizer_dir={ws.corpus['tokenizer']}", f"training.run_dir={run}", "monitor.wandb_mode=disabled",
                   "checkpoint.save_interval=3", "checkpoint.keep_last_n=0", *extra]


def resume(ws, d, *extra):
    """Resume the copied run to iteration 9."""
    return train_args(ws, os.path.join(d, "run"), "training.train_iters=9", *extra)


def fresh(ws, d, *extra, **kw):
    """A new run in the case directory (nothing there before)."""
    return train_args(ws, os.path.join(d, "fresh"), "training.train_iters=3", *extra, **kw)


def ckpt(d: str, *parts: str) -> str:
    return os.path.join(d, "run", "checkpoints", *parts)


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_bytes(path: str, at: float = 0.5, n: int = 8, start: int = 0, length: Optional[int] = None) -> None:
    """Invert n bytes in the middle of the file (or of its bytes [start, start + length)): same size,
    still parses as often as not."""
    length = os.path.getsize(path) - start if length is None else length
    with open(path, "r+b") as f:
        f.seek(start + int(length * at))
        b = f.read(n)
        f.seek(-len(b), 1)
        f.write(bytes(x ^ 0xFF for x in b))


def _distcp(iter_path: str) -> List[str]:
    names = sorted(n for n in os.listdir(iter_path) if n.endswith(".distcp"))
    assert names, f"{iter_path} holds no .distcp"
    return names


def largest_shard(iter_path: str) -> str:
    """The name of the largest .distcp the save wrote (0.16: __0_1.distcp here; 0.17+: __0_0.distcp)."""
    return max(_distcp(iter_path), key=lambda n: (os.path.getsize(os.path.join(iter_path, n)), n))


def first_shard(iter_path: str) -> str:
    return _distcp(iter_path)[0]


def common_state(iter_path: str) -> tuple:
    """(file name, offset, length) of the checkpoint's common (non-tensor) state: all of common.pt
    (megatron-core 0.16), or the common_state record inside a .distcp (0.17+), located through
    the checkpoint's own .metadata."""
    if os.path.isfile(os.path.join(iter_path, "common.pt")):
        return "common.pt", 0, os.path.getsize(os.path.join(iter_path, "common.pt"))
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_attnedit.convert.checkpoint import COMMON_STATE_KEY

    storage = FileSystemReader(iter_path).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == COMMON_STATE_KEY)
    return info.relative_path, info.offset, info.length


def saved_files(iter_path: str) -> Dict[str, str]:
    """The names the fragments use: {shard} the largest .distcp, {common} the common state's file."""
    return {"shard": largest_shard(iter_path), "common": common_state(iter_path)[0]}


def only_latest(d: str) -> None:
    shutil.rmtree(ckpt(d, "iter_0000003"))


def _latest_missing(ws, d):
    os.remove(ckpt(d, LATEST))
    return resume(ws, d)


def _latest_garbage(ws, d):
    open(ckpt(d, LATEST), "w").write("six\n")
    return resume(ws, d)


def _latest_names_nothing(ws, d):
    for it in ("iter_0000003", "iter_0000006"):
        shutil.rmtree(ckpt(d, it))
    return resume(ws, d)


def _save_dir_unnamed(ws, d):
    """checkpoint.save (other than checkpoint.load) holds iterations of another run but no latest file."""
    other = os.path.join(d, "other", "checkpoints")
    shutil.copytree(ckpt(d), other)
    os.remove(os.path.join(other, LATEST))
    return resume(ws, d, f"checkpoint.load={ckpt(d)}", f"checkpoint.save={other}")


def _all_truncated(ws, d):
    for it in ("iter_0000003", "iter_0000006"):
        truncate(ckpt(d, it, largest_shard(ckpt(d, it))), 100_000)
    return resume(ws, d)


def _common_flipped(ws, d):
    only_latest(d)
    name, start, length = common_state(ckpt(d, "iter_0000006"))
    flip_bytes(ckpt(d, "iter_0000006", name), start=start, length=length)
    return resume(ws, d)


def _dcp_metadata_flipped(ws, d):
    only_latest(d)
    flip_bytes(ckpt(d, "iter_0000006", ".metadata"), 0.3)
    return resume(ws, d)


def _metadata_json_missing(ws, d):
    only_latest(d)
    os.remove(ckpt(d, "iter_0000006", "metadata.json"))
    return resume(ws, d)


def _old_checkpoint_truncated(ws, d):
    """Written before manifests (none to check against): the load itself fails, in one line."""
    only_latest(d)
    if os.path.exists(ckpt(d, "iter_0000006", "manifest.json")):
        os.remove(ckpt(d, "iter_0000006", "manifest.json"))
    truncate(ckpt(d, "iter_0000006", largest_shard(ckpt(d, "iter_0000006"))), 100_000)
    return resume(ws, d)


def _zero_length_shard(ws, d):
    only_latest(d)
    truncate(ckpt(d, "iter_0000006", first_shard(ckpt(d, "iter_0000006"))), 0)
    return resume(ws, d)


def _other_target_resume(ws, d):
    return resume(ws, d, "target.name=gate_swa", "target.options={window: 16, pattern: SSSF}")


def _other_shape_resume(ws, d):
    return resume(ws, d, "model.overrides.num_hidden_layers=2")


def _weights_only_resume(ws, d):
    return resume(ws, d, f"checkpoint.load={ws.teacher_mcore}")


def _tp_change(ws, d):
    return resume(ws, d, "parallel.tensor_model_parallel_size=2")


def _gateswa_from_mla(ws, d):
    return fresh(ws, d, f"checkpoint.pretrained_checkpoint={ws.mla_stage1}/checkpoints", recipe="tiny_gateswa", stage="stage2")


def _stage2_from_teacher(ws, d):
    return fresh(ws, d, f"checkpoint.pretrained_checkpoint={ws.teacher_mcore}", recipe="tiny_gateswa", stage="stage2")


def _pretrained_damaged(ws, d):
    truncate(ckpt(d, "iter_0000006", largest_shard(ckpt(d, "iter_0000006"))), 100_000)
    return fresh(ws, d, f"checkpoint.pretrained_checkpoint={ckpt(d, 'iter_0000006')}")


def _pretrained_missing(ws, d):
    return fresh(ws, d, f"checkpoint.pretrained_checkpoint={os.path.join(d, 'no_such_checkpoint')}")


def _too_long(ws, d):
    return fresh(ws, d, "data.seq_length=600")


def _data_too_short(ws, d):
    return fresh(ws, d, f"data.data_path=[{ws.short}]")


def _data_bin_cut(ws, d):
    prefix = os.path.join(d, "cut")
    for ext in (".bin", ".idx"):
        shutil.copyfile(ws.corpus["prefix"] + ext, prefix + ext)
    truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") // 2)
    return fresh(ws, d, f"data.data_path=[{prefix}]")


def _data_missing(ws, d):
    return fresh(ws, d, f"data.data_path=[{os.path.join(d, 'nothing')}]")


def _run_dir_under_a_file(ws, d):
    open(os.path.join(d, "a_file"), "w").write("not a directory\n")
    return train_args(ws, os.path.join(d, "a_file", "run"), "training.train_iters=3")


def _unknown_key(ws, d):
    return resume(ws, d, "training.train_itres=9")


def _batch_not_divisible(ws, d):
    return resume(ws, d, "data.global_batch_size=6", "data.micro_batch_size=2")


def _disk_full(ws, d):
    return resume(ws, d)


CASES: List[Case] = [
    Case("latest_file_missing", "latest_checkpointed_iteration.txt deleted, iterations 3 and 6 still there",
         _latest_missing, 2, "but no latest_checkpointed_iteration.txt"),
    Case("latest_file_not_a_number", "latest_checkpointed_iteration.txt holds 'six'", _latest_garbage, 2, "not an iteration number"),
    Case("latest_names_a_missing_iteration", "latest says 6, no iteration directory left", _latest_names_nothing, 2,
         "iter_0000006: its directory is missing"),
    Case("save_dir_holds_unnamed_iterations", "checkpoint.save holds iterations but no latest file (load elsewhere)", _save_dir_unnamed,
         2, "other/checkpoints holds checkpoints (iter_0000003, iter_0000006) but no latest"),
    Case("every_checkpoint_truncated", "a .distcp cut to 100 kB in both iterations", _all_truncated, 2, "no complete checkpoint"),
    Case("common_pt_bytes_flipped", "8 bytes of the common state (common.pt, or its record in a .distcp) inverted (same size), "
         "only iteration", _common_flipped, 2, "{common} does not match its checksum"),
    Case("dcp_metadata_bytes_flipped", "8 bytes of .metadata inverted (same size), only iteration", _dcp_metadata_flipped, 2,
         ".metadata does not match its checksum"),
    Case("metadata_json_missing", "metadata.json deleted, only iteration", _metadata_json_missing, 2, "has no metadata.json"),
    Case("shard_zero_bytes", "a .distcp emptied, only iteration", _zero_length_shard, 2, "is 0 bytes where"),
    Case("old_checkpoint_truncated", "a checkpoint without manifest (as before manifests) with a .distcp cut short",
         _old_checkpoint_truncated, 2, "cannot load"),
    Case("resume_at_other_tp", "resume a TP=1 run at TP=2", _tp_change, 2, "saved at TP=1, PP=1, EP=1 and this run has TP=2", nproc=2),
    Case("resume_with_other_target", "resume an lm run with target.name=gate_swa", _other_target_resume, 2,
         "holds a model with the teacher's own attention (no target) and this run trains target gate_swa"),
    Case("resume_with_other_shape", "resume with model.overrides.num_hidden_layers=2", _other_shape_resume, 2,
         "another shape than this run's (num_hidden_layers 4 vs 2"),
    Case("resume_from_weights_only", "checkpoint.load at an hf_to_mcore.py conversion", _weights_only_resume, 2, "holds model weights only"),
    Case("gateswa_stage2_from_mla_stage1", "GateSWA stage 2 with pretrained_checkpoint at an MLA stage-1 run", _gateswa_from_mla, 2,
         "holds a model with target mla and this run trains target gate_swa"),
    Case("stage2_from_teacher_conversion", "stage 2 with pretrained_checkpoint at the teacher's hf_to_mcore.py conversion",
         _stage2_from_teacher, 2, "holds a model with the teacher's own attention (no target)"),
    Case("pretrained_iteration_truncated", "pretrained_checkpoint at an iteration directory with a .distcp cut short",
         _pretrained_damaged, 2, "is damaged: {shard} is 100,000 bytes"),
    Case("pretrained_missing", "pretrained_checkpoint at a path that does not exist", _pretrained_missing, 2, "is not a directory"),
    Case("longer_than_trained", "data.seq_length=600 for a model of max_position_embeddings 512", _too_long, 2,
         "longer than the model's max_position_embeddings=512"),
    Case("data_shorter_than_one_sample", "a dataset of 7 tokens at data.seq_length=64", _data_too_short, 2, "fewer than one sample"),
    Case("data_bin_cut_short", "a dataset whose .bin lost its second half", _data_bin_cut, 2, "its index describes"),
    Case("data_missing", "data.data_path names a prefix with no files", _data_missing, 2, "not found"),
    Case("run_dir_under_a_file", "training.run_dir inside a regular file", _run_dir_under_a_file, 2, "not a directory"),
    Case("unknown_config_key", "--set training.train_itres=9", _unknown_key, 2, "did you mean 'training.train_iters'"),
    Case("batch_not_divisible", "global batch 6 of micro-batches of 2 on 2 data-parallel ranks", _batch_not_divisible, 2,
         "must be a multiple of micro_batch_size x data-parallel size", nproc=2),
    Case("file_size_limit_while_saving", "RLIMIT_FSIZE 1 MB: the iteration-9 save's shards fail with EFBIG", _disk_full, 1,
         "saving iteration 9", fsize_limit=1_000_000),
    Case("disk_full_while_saving", "checkpoints on a 9 MB tmpfs holding iterations 3 and 6: the iteration-9 save fails with ENOSPC",
         _disk_full, 1, "the disk is full", tmpfs_bytes=9_000_000),
]


# ------------------------------------------------------------------------------------------------
# Building the workspace, running the cases, judging the outcome
# ------------------------------------------------------------------------------------------------


def _train(args: List[str], nproc: int = 1) -> None:
    cmd = [sys.executable, "-m", "megatron_attnedit.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def prepare_workspace(root: str) -> Workspace:
    """Everything the cases start from (about 30 s on 2 cores)."""
    sys.path.insert(0, HERE)
    from training_data import make_corpus

    from megatron_attnedit.testing import make_tiny_hf

    os.makedirs(root, exist_ok=True)
    hf = os.path.join(root, "hf")
    make_tiny_hf(hf, "qwen3-debug", seed=1)
    corpus = make_corpus(os.path.join(root, "corpus"))
    ws = Workspace(root=root, hf=hf, corpus=corpus, trained=os.path.join(root, "trained"), mla_stage1=os.path.join(root, "mla_stage1"),
                   teacher_mcore=os.path.join(root, "teacher_mcore"), short=os.path.join(root, "short"))
    _train(train_args(ws, ws.trained, "training.train_iters=6"))
    ws.files = saved_files(os.path.join(ws.trained, "checkpoints", "iter_0000006"))
    _train(train_args(ws, ws.mla_stage1, "training.train_iters=3", recipe="tiny_mla", stage="stage1"))
    conv = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoints_tools", "hf_to_mcore.py"), "--hf-dir", hf, "--save-dir",
                           ws.teacher_mcore, "--no-progress"], capture_output=True, text=True, env=ENV, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    jsonl = os.path.join(root, "short.jsonl")
    open(jsonl, "w").write(json.dumps({"text": "the cat sees the ball."}) + "\n")
    sys.path.insert(0, os.path.join(ROOT, "checkpoints_tools"))
    import preprocess_data

    preprocess_data.main(["--input", jsonl, "--tokenizer-dir", corpus["tokenizer"], "--output-prefix", ws.short])
    return ws


def snapshot(path: str) -> Optional[Dict[str, tuple]]:
    """{relative path: (size, crc32)} of every file under path; None when it does not exist."""
    if not os.path.exists(path):
        return None
    out = {}
    for base, _, names in os.walk(path):
        for n in names:
            p = os.path.join(base, n)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), zlib.crc32(open(p, "rb").read()))
    return out


def checkpoint_dirs(case_dir: str) -> List[str]:
    """The checkpoint directories a case may touch: the copied run's, a fresh run's, another's."""
    return [os.path.join(case_dir, x, "checkpoints") for x in ("run", "fresh", "other")]


def command_line(case: Case, args: List[str]) -> str:
    cmd = f"python -m megatron_attnedit.train {shlex.join(args)}"
    if case.nproc > 1:
        cmd = f"torchrun --nproc-per-node={case.nproc} -m megatron_attnedit.train {shlex.join(args)}"
    return cmd


def tmpfs_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0


def _run_on_tmpfs(case: Case, args: List[str], case_dir: str) -> List[dict]:
    """The case's command with its checkpoint directory on a tmpfs of case.tmpfs_bytes, mounted in
    a user and mount namespace of its own (no privileges needed); the directory is copied back to
    where it was afterwards, so the outcome is judged as for any other case."""
    real = ckpt(case_dir)
    mnt = os.path.join(case_dir, "small")
    os.makedirs(mnt)
    script = (f"mount -t tmpfs -o size={case.tmpfs_bytes} tmpfs {shlex.quote(mnt)} && cp -a {shlex.quote(real)} {shlex.quote(mnt)}/ "
              f"&& {shlex.quote(sys.executable)} -m megatron_attnedit.train {shlex.join(args)} --set checkpoint.save={shlex.quote(mnt)}/checkpoints; "
              f"rc=$?; rm -rf {shlex.quote(real)} && cp -a {shlex.quote(mnt)}/checkpoints {shlex.quote(real)}; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    return [{"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}]


def run_cases(cases: List[Case], ws: Workspace, root: str) -> Dict[str, dict]:
    """Run every case in a copy of the trained run under root/<name>; returns per case its ranks'
    results ({"rc", "stdout", "stderr"}), the command line, and the checkpoint directories'
    snapshots before and after."""
    out, batch = {}, []
    for case in cases:
        d = os.path.join(root, case.name)
        shutil.copytree(ws.trained, os.path.join(d, "run"))
        args = case.make(ws, d)
        out[case.name] = {"dir": d, "args": args, "command": command_line(case, args), "fragment": case.expected(ws),
                          "before": [snapshot(p) for p in checkpoint_dirs(d)]}
        if case.tmpfs_bytes:
            out[case.name]["ranks"] = _run_on_tmpfs(case, args, d) if tmpfs_available() else None
        else:
            batch.append({"name": case.name, "argv": args, "nproc": case.nproc, "fsize_limit": case.fsize_limit})
    spec, result = os.path.join(root, "cases.json"), os.path.join(root, "results.json")
    json.dump(batch, open(spec, "w"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", "train_cases.py"), spec, result], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, ranks in json.load(open(result)).items():
        out[name]["ranks"] = ranks
    for case in cases:
        out[case.name]["after"] = [snapshot(p) for p in checkpoint_dirs(out[case.name]["dir"])]
    return out


def problems(case: Case, result: dict) -> List[str]:
    """What is wrong with a case's outcome (empty: as promised)."""
    found = []
    first, others = result["ranks"][0], result["ranks"][1:]
    lines = first["stderr"].strip().splitlines()
    last = lines[-1] if lines else ""
    if first["rc"] != case.exit_code:
        found.append(f"exit code {first['rc']}, expected {case.exit_code}")
    fragment = result["fragment"]
    if not last.startswith("error: ") or fragment not in last:
        found.append(f"last stderr line {last!r} is not an error line holding {fragment!r}")
    if "Traceback" in first["stderr"] or sum(x.startswith("error:") for x in lines) != 1:
        found.append("stderr holds a traceback or more than one error line")
    for rank, r in enumerate(others, 1):
        if r["rc"] != case.exit_code or "error:" in r["stderr"] or "Traceback" in r["stderr"]:
            found.append(f"rank {rank}: exit code {r['rc']}, stderr {r['stderr'][-500:]!r}")
    if result["before"] != result["after"]:
        found.append("the checkpoint directory changed")
    return found
