"""The converters under bad input and faults.

* Every converter row of ``tests/bad_inputs.py``: exit code 2, stderr's last line one ``error:``
  line holding the row's fragment and no "Traceback", the output location unchanged (absent if it
  was absent), no hidden partial directory beside it.
* A converter killed with SIGKILL mid-write: its ``.NAME.partial-*`` directory is removed by the
  next conversion to NAME, which says so in one line; debris a live writer owns is left alone.
* A real full disk and a read-only file system (a small tmpfs; only where this user may mount).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import bad_inputs
from bad_inputs import CONVERTER_CASES, PREREQUISITES, Workspace
from conftest import ROOT

TOOLS = os.path.join(ROOT, "checkpoints_tools")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_cases(cases, w, tag):
    """Run converter cases [{name, tool, argv, fsize_limit?}] in one forked-CLI worker."""
    plan, result = w / f"{tag}.json", w / f"{tag}-result.json"
    plan.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "convert_cli_cases.py"), str(plan), str(result)],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def walked(tiny_hf, tmp_path_factory):
    w = tmp_path_factory.mktemp("reliability")
    sources = {"hf_dense": tiny_hf["dense"], "hf_moe": tiny_hf["moe"]}
    sources.update({name: str(w / "sources" / name) for name in PREREQUISITES})
    done = run_cases([dict(name=n, tool=tool, argv=[a.format(**sources) for a in argv]) for n, (tool, argv) in PREREQUISITES.items()], w, "sources")
    assert all(r["rc"] == 0 for r in done.values()), done
    ws = Workspace(str(w / "cases"), sources)
    paths, before, plan = {}, {}, []
    for case in CONVERTER_CASES:
        paths[case.name] = bad_inputs.build(case, ws)
        before[case.name] = bad_inputs.snapshot(paths[case.name]["out"])
        plan.append(dict(name=case.name, tool=case.tool, argv=bad_inputs.argv_of(case, paths[case.name]), fsize_limit=case.fsize_limit))
    results = run_cases(plan, w, "cases")
    return {c.name: (results[c.name], paths[c.name], before[c.name], bad_inputs.snapshot(paths[c.name]["out"])) for c in CONVERTER_CASES}


@pytest.mark.parametrize("case", CONVERTER_CASES, ids=[c.name for c in CONVERTER_CASES])
def test_bad_input_one_line_output_unchanged(walked, case):
    r, paths, before, after = walked[case.name]
    last = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
    assert r["rc"] == case.exit_code, r
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert last.startswith("error: ") and case.fragment in last, last
    assert after == before, f"{paths['out']} changed"
    assert bad_inputs.debris_beside(paths["out"]) == []


def test_table_has_the_issue_kinds():
    """The rows cover what the issue found, so that dropping one is a visible change."""
    names = {c.name for c in CONVERTER_CASES}
    for must in ("hf-vocab-smaller-than-embedding", "hf-vocab-larger-than-embedding", "mc-vocab-smaller-in-metadata", "hf-tensor-transposed",
                 "mc-distcp-truncated", "mc-distcp-transposed", "overwrite-with-foreign-entries", "disk-full-hf-to-mcore", "hf-nan-bytes"):
        assert must in names
    assert len(CONVERTER_CASES) >= 30


# --------------------------------------------------------------------------------------------
# kill -9 mid-write, and what the next run does with the debris
# --------------------------------------------------------------------------------------------

MIDSIZE = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=1536,
               num_hidden_layers=2, vocab_size=32000)  # ~160 MB fp32: long enough a write to be caught in the middle


def _partials(parent, base):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}.partial-"))


def _bytes(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


@pytest.fixture(scope="module")
def midsize_hf(tmp_path_factory):
    from megatron_attnedit.testing import make_tiny_hf

    hf = str(tmp_path_factory.mktemp("midsize") / "hf")
    make_tiny_hf(hf, "qwen3-debug", seed=0, **MIDSIZE)
    return hf


def _signal_mid_write(cmd, parent, base, sig):
    """Start a conversion, send ``sig`` once its partial directory holds 20 MB; (process, partial dir, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, partial = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        found = _partials(parent, base)
        if found and _bytes(parent / found[0]) > 20e6:  # some of the weights are on disk
            partial = parent / found[0]
            os.kill(proc.pid, sig)
            break
        time.sleep(0.01)
    _, err = proc.communicate()
    assert partial is not None, "the conversion ended before it could be stopped mid-write"
    return proc, partial, err


def test_killed_conversion_leaves_debris_the_next_run_removes(midsize_hf, tmp_path):
    out = tmp_path / "mc"
    cmd = [sys.executable, os.path.join(TOOLS, "hf_to_mcore.py"), "--hf-dir", midsize_hf, "--save-dir", str(out), "--no-progress"]
    proc, partial, _ = _signal_mid_write(cmd, tmp_path, "mc", signal.SIGKILL)
    assert not out.exists() and partial.exists()
    left = _bytes(partial)

    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    notes = [line for line in second.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, second.stderr
    assert f"removed {partial} ({left / 1e6:.1f} MB), left by an interrupted conversion (pid {proc.pid}" in notes[0], notes[0]
    assert _partials(tmp_path, "mc") == [] and (out / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_sigterm_mid_write_one_line_nothing_left(midsize_hf, tmp_path, fmt):
    """SIGTERM (a scheduler's) while torch.save is writing: exit 130, one line, nothing left --
    not torch's zip writer's "unexpected pos", which is what it makes of the interrupt."""
    out = tmp_path / "mc"
    cmd = [sys.executable, os.path.join(TOOLS, "hf_to_mcore.py"), "--hf-dir", midsize_hf, "--save-dir", str(out), "--no-progress",
           "--ckpt-format", fmt]
    proc, _, err = _signal_mid_write(cmd, tmp_path, "mc", signal.SIGTERM)
    assert proc.returncode == 130 and err.splitlines() == ["error: interrupted; nothing was written"], err
    assert os.listdir(tmp_path) == []


def test_sweep_leaves_live_and_unrecorded_debris(tmp_path):
    """Debris a running writer owns, or that names no writer, is reported and left; a dead
    writer's (a finished process's PID) is removed -- for .old- siblings too."""
    from megatron_attnedit.convert import outdir

    out = tmp_path / "hf"
    live, unrecorded, dead = tmp_path / ".hf.partial-live", tmp_path / ".hf.partial-norecord", tmp_path / ".hf.old-dead"
    other = tmp_path / ".hf2.partial-x"  # another output's: not ours to touch
    for d in (live, unrecorded, dead, other):
        d.mkdir()
        (d / "weights").write_bytes(b"\0" * 1000)
    outdir._record_writer(str(live), "mcore_to_hf")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dead / outdir.WRITER).write_text(json.dumps({"tool": "mcore_to_hf", "host": os.uname().nodename, "pid": int(finished.stdout), "start": "1"}))
    notes = outdir.sweep_stale(str(out))
    assert len(notes) == 3, notes
    assert any(f"{live}" in n and "being written by a running conversion" in n for n in notes)
    assert any(f"{unrecorded}" in n and "did not record its writer" in n for n in notes)
    assert any(n.startswith(f"removed {dead}") for n in notes)
    assert live.exists() and unrecorded.exists() and other.exists() and not dead.exists()


# --------------------------------------------------------------------------------------------
# A real full disk and a read-only file system
# --------------------------------------------------------------------------------------------


def _mount_tmpfs(where, options):
    where.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.fixture
def small_and_read_only_tmpfs(tmp_path):
    small, ro = tmp_path / "small", tmp_path / "ro"
    mounted = [d for d, opts in ((small, "size=512k"), (ro, "size=64k,ro")) if _mount_tmpfs(d, opts)]
    try:
        if len(mounted) < 2:
            pytest.skip("mounting a tmpfs needs root (the file-size-limit rows of bad_inputs cover the same OSError path)")
        yield small, ro
    finally:
        for d in mounted:
            subprocess.run(["umount", str(d)], check=True)


def test_full_disk_and_read_only_fs(small_and_read_only_tmpfs, tiny_hf, tmp_path):
    small, ro = small_and_read_only_tmpfs
    argv = lambda out: ["--hf-dir", tiny_hf["dense"], "--save-dir", str(out), "--no-progress"]  # noqa: E731
    r = run_cases([dict(name="full", tool="hf_to_mcore", argv=argv(small / "out")), dict(name="ro", tool="hf_to_mcore", argv=argv(ro / "out"))],
                  tmp_path, "fs")
    for name, line in (("full", f"error: {small / 'out'}: no space left on the device; free space or write elsewhere"),
                       ("ro", f"error: {ro / 'out'}: read-only file system; write elsewhere")):
        assert r[name]["rc"] == 2 and "Traceback" not in r[name]["stderr"], r[name]
        assert r[name]["stderr"].strip().splitlines()[-1] == line
    assert os.listdir(small) == [] and os.listdir(ro) == [], "a failed write left something behind"


# --------------------------------------------------------------------------------------------
# Training's HF loading (hf_io.load_into_model) checks the same shapes
# --------------------------------------------------------------------------------------------

LOAD_INTO_MODEL = """
import sys
from megatron_attnedit import platform
from megatron_attnedit.convert import hf_io
from megatron_attnedit.families.table import ModelTable
from megatron_attnedit.models import builder
from megatron_attnedit import families
platform.init_distributed(platform.init_platform("cpu"))
for d in sys.argv[1:]:
    cfg = families.load_hf_config(d)
    model = builder.build_model(cfg, builder.BuildOptions())
    try:
        hf_io.load_into_model(model, hf_io.HFCheckpoint(d), ModelTable(cfg))
        print("loaded")
    except hf_io.CheckpointError as e:
        print("refused:", e)
"""


def test_load_into_model_refuses_what_the_converter_refuses(tiny_hf, tmp_path):
    """A teacher loaded straight from HF (training's path) gets the converter's checks: vocab rows,
    a transposed tensor with the right element count, NaN values."""
    from bad_inputs import K_PROJ, edit_config, edit_safetensors

    dirs = []
    for name, edit in (("v200", lambda d: edit_config(d, vocab_size=200)),
                       ("transposed", lambda d: edit_safetensors(d, lambda t: t.update({K_PROJ: t[K_PROJ].t().contiguous()}))),
                       ("nan", lambda d: edit_safetensors(d, lambda t: t["model.norm.weight"].fill_(float("nan"))))):
        d = str(tmp_path / name)
        shutil.copytree(tiny_hf["dense"], d)
        edit(d)
        dirs.append(d)
    proc = subprocess.run([sys.executable, "-c", LOAD_INTO_MODEL, tiny_hf["dense"], *dirs], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "loaded"
    assert lines[1].startswith("refused:") and "would drop 56 vocabulary rows" in lines[1], lines[1]
    assert lines[2].startswith("refused:") and f"{K_PROJ} in" in lines[2] and "stored transposed" in lines[2], lines[2]
    assert lines[3].startswith("refused:") and "non-finite" in lines[3], lines[3]


def test_files_another_tool_adds_are_replaced_with_the_output(tmp_path):
    """A model card written beside an export (teacher card: README.md, teacher_card.json) is
    recorded in the export's manifest, so OVERWRITE=1 train_teacher.sh's mcore_to_hf --overwrite
    replaces it with the export; before it is recorded it is refused like any foreign file."""
    from megatron_attnedit.convert import outdir
    from megatron_attnedit.errors import CheckpointError

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / outdir.MANIFEST).write_text(json.dumps({"tool": "mcore_to_hf", "paths": ["config.json"]}))
    (d / "README.md").write_text("card")
    with pytest.raises(CheckpointError, match="also holds README.md, which mcore_to_hf did not write"):
        outdir.check_output_dir(str(d), True, "mcore_to_hf")
    outdir.add_to_manifest(str(d), ["README.md"], "teacher card")
    outdir.check_output_dir(str(d), True, "mcore_to_hf")
    with pytest.raises(CheckpointError, match="pass --overwrite"):
        outdir.check_output_dir(str(d), False, "mcore_to_hf")
