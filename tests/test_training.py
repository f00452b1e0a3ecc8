"""The training loop on CPU with the lm objective (2 gloo processes where it matters):

* loss goes down; the first 10 losses at TP=2 and at PP=2 equal those at TP=1 (within 1%);
* 20 steps straight == 10 steps, SIGKILL of the whole process group, resume to 20: identical
  losses and identical final checkpoints (weights, optimizer state, RNG states);
* a two-node launch on one machine (launch/pretrain.sh twice, one process each) trains, and its
  W&B offline run holds the logged metrics;
* a NaN loss stops the run with one line and leaves the last good checkpoint as the latest;
* torch's fused AdamW resumes a multi-tensor AdamW checkpoint and follows its run;
* weight gradients accumulated inside the GEMM (kernels/wgrad.py) train like megatron's unfused path;
* gradient reduce and parameter all-gather overlapped with backward and forward (several buckets)
  follow the plain run, and its saves and evaluations see the updated parameters;
* the MoE model at EP=2 (sequential and grouped experts) follows EP=1 step for step; a resume that
  switches between the two expert implementations is refused in one line.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, WORKERS, free_port, torchrun
from training_data import make_corpus
from megatron_attnedit.training.monitor import read_metrics, read_wandb_history

ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))


def overrides(corpus, hf_dir, run_dir, *extra):
    return ["--recipe", "tiny_lm", "--set", f"model.hf_dir={hf_dir}", "model.preset=null", f"data.data_path=[{corpus['prefix']}]",
            f"data.tokenizer_dir={corpus['tokenizer']}", f"training.run_dir={run_dir}", "monitor.wandb_mode=disabled", *extra]


def losses(run_dir, n=None):
    m = read_metrics(str(run_dir))
    return [m[i]["loss"] for i in sorted(m)][:n]


@pytest.fixture(scope="module")
def straight(corpus, tiny_hf, tmp_path_factory):
    """20 steps at TP=1 on 2 data-parallel ranks, checkpoints at 10 and 20."""
    run = tmp_path_factory.mktemp("straight")
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], run, "training.train_iters=20"))
    return run


def test_lm_loss_goes_down(straight):
    ls = losses(straight)
    assert len(ls) == 20
    assert sum(ls[-3:]) / 3 < ls[0] - 1.0, ls  # ~5.5 (uniform over 256) -> well below


TP2 = "parallel.tensor_model_parallel_size=2"
LAYOUTS = {"tp2": [TP2], "tp2sp": [TP2, "parallel.sequence_parallel=true"], "pp2": ["parallel.pipeline_model_parallel_size=2"]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_first_losses_match_tp1(straight, corpus, tiny_hf, tmp_path, layout):
    # Same schedule as the 20-step reference (decay over 20 iterations), only the first 10 steps.
    # tp2sp: sequence parallelism with the local spec's norms (builder.LocalRMSNorm).
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], tmp_path, *LAYOUTS[layout], "training.train_iters=10",
                                           "optimizer.lr_decay_iters=20", "checkpoint.save_interval=0"))
    ref, got = losses(straight, 10), losses(tmp_path, 10)
    assert len(got) == 10
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 0.01 * abs(a), f"step {i + 1}: TP=1 {a:.5f} vs {layout} {b:.5f}\n{ref}\n{got}"


def _same(x, y) -> bool:
    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    if hasattr(x, "getvalue"):
        return x.getvalue() == y.getvalue()
    return x == y


def _parameter_positions(bucket, weights) -> torch.Tensor:
    """Mask of the positions of a flattened optimizer bucket (its main params) that hold a parameter:
    every weight (per layer: megatron stacks layers in the checkpoint) is found as a contiguous run."""
    held = torch.zeros(bucket.numel(), dtype=torch.bool)
    for key, w in weights.items():
        for piece in (w.unbind(0) if key.startswith("decoder.layers.") else [w]):
            v = piece.reshape(-1)
            starts = [c for c in (bucket == v[0]).nonzero().flatten().tolist() if torch.equal(bucket[c:c + v.numel()], v)]
            assert starts, f"{key} not found in the optimizer bucket"
            held[starts[0]:starts[0] + v.numel()] = True
    assert held.sum() >= 0.99 * bucket.numel()
    return held


def _dcp_tensors(ckpt_dir, out):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir), str(out))
    return torch.load(out, weights_only=False)


def test_resume_after_sigkill_is_exact(straight, corpus, tiny_hf, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", os.path.join(WORKERS, "train_worker.py"),
           *overrides(corpus, tiny_hf["dense"], run, "training.train_iters=20")]
    latest = run / "checkpoints" / "latest_checkpointed_iteration.txt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not (latest.exists() and latest.read_text().strip() == "10"):
                assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
                assert time.time() < deadline, "no step-10 checkpoint in time"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest.read_text().strip() == "10" and max(read_metrics(str(run))) < 20
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], run, "training.train_iters=20"))
    assert losses(run) == losses(straight)  # bit-identical, resumed steps 11..20 included
    a = _dcp_tensors(straight / "checkpoints" / "iter_0000020", tmp_path / "a.pt")
    b = _dcp_tensors(run / "checkpoints" / "iter_0000020", tmp_path / "b.pt")
    assert sorted(a) == sorted(b)
    assert any(k.startswith("decoder.layers") for k in a) and any(k.startswith("optimizer.") for k in a)
    # The distributed optimizer's flattened buckets hold uninitialised alignment padding between
    # parameters; compare them where the parameters are (located through the saved weights).
    weights = {k: v for k, v in a.items() if torch.is_tensor(v) and not k.startswith("optimizer.")}
    for k in a:  # weights, optimizer state, per-rank RNG and objective states
        if k.startswith("optimizer.") and torch.is_tensor(a[k]):
            held = _parameter_positions(a[k.rsplit(".", 1)[0] + ".param"], weights)
            assert torch.equal(a[k][held], b[k][held]), k
        else:
            assert _same(a[k], b[k]), k
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_0000010", "iter_0000020", "latest_checkpointed_iteration.txt"]


def test_two_node_launch_and_wandb_offline_metrics(corpus, tiny_hf, tmp_path):
    """Also: a weighted blend of two datasets and a separate validation set."""
    run = tmp_path / "run"
    port = free_port()
    args = overrides(corpus, tiny_hf["dense"], run, "training.train_iters=3", "monitor.wandb_mode=offline", "checkpoint.save_interval=0",
                     f"data.data_path=[{corpus['prefix']}, {corpus['prefix2']}]", "data.data_weights=[0.7, 0.3]",
                     f"data.valid_data_path=[{corpus['prefix2']}]", "training.eval_interval=3", "training.eval_iters=1")[2:]
    procs = []
    for node in (0, 1):
        env = dict(ENV, NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1", PLATFORM="cpu")
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(["bash", os.path.join(ROOT, "launch", "pretrain.sh"), "tiny_lm", *args],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
    for p in procs:
        p.wait(timeout=400)
    out = open(tmp_path / "node0.log").read()
    assert [p.returncode for p in procs] == [0, 0], out[-3000:] + open(tmp_path / "node1.log").read()[-3000:]
    assert "iter 3/3 | loss" in out
    metrics = read_metrics(str(run))
    assert sorted(metrics) == [1, 2, 3]
    history = read_wandb_history(str(run))
    rows = [r for r in history if "loss" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3]
    assert [r["_step"] for r in history if "val_loss" in r] == [3] and metrics[3]["val_loss"] > 0
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_gb"):
            assert r[key] == pytest.approx(metrics[r["_step"]][key]), key
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "iter_0000003").is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tiny_hf, tmp_path):
    cmd = [sys.executable, os.path.join(WORKERS, "train_worker.py"), "--nan-at", "6",
           *overrides(corpus, tiny_hf["dense"], tmp_path, "training.train_iters=10", "checkpoint.save_interval=2",
                      "data.global_batch_size=2", "data.micro_batch_size=2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "loss is nan at iteration 6" in errors[0] and "last good checkpoint is iteration 4" in errors[0], errors[0]
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(os.listdir(ckpts)) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    assert (ckpts / "iter_0000004" / "metadata.json").exists()
    assert max(read_metrics(str(tmp_path))) == 5


def test_fused_adam_resumes_an_unfused_run(straight, corpus, tiny_hf, tmp_path):
    """optimizer.fused_adam (torch's fused AdamW kernel; on CUDA by default) resumes a checkpoint
    written by the multi-tensor AdamW and then follows the unfused 20-step run to rounding."""
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], tmp_path, "training.train_iters=10", "optimizer.lr_decay_iters=20",
                                           "optimizer.fused_adam=false"))
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], tmp_path, "training.train_iters=20", "optimizer.fused_adam=true"))
    ref, got = losses(straight), losses(tmp_path)
    assert got[:10] == ref[:10] and len(got) == 20
    for i in range(10, 20):
        assert abs(got[i] - ref[i]) <= 1e-4 * abs(ref[i]), f"step {i + 1}: foreach {ref[i]:.6f} vs fused {got[i]:.6f}"
    state = _dcp_tensors(tmp_path / "checkpoints" / "iter_0000020", tmp_path / "s.pt")
    groups = [g for k, v in state.items() if k.startswith("optimizer.") and k.endswith("optimizer/shard_0_1") for g in v[0]["param_groups"]]
    assert groups and all(g["fused"] and not g["foreach"] for g in groups), groups


def test_overlapped_grad_reduce_and_param_gather_follow_the_plain_run(straight, corpus, tiny_hf, tmp_path):
    """parallel.overlap_grad_reduce / overlap_param_gather (on for GPU/NPU by default): buckets of ~2K
    parameters reduced from DDP's backward hooks and all-gathered from its forward pre-hooks give the
    20-step run's losses, evaluations in between change nothing, and the step-10 and step-20 saves
    hold the updated weights (the gather is forced before a save: without it, they hold the previous
    step's weights on the shards other ranks updated, about 4e-4 off here)."""
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], tmp_path, "training.train_iters=20", "parallel.overlap_grad_reduce=true",
                                           "parallel.overlap_param_gather=true", "parallel.ddp_bucket_size=2000",
                                           "training.eval_interval=7", "training.eval_iters=1"))
    ref, got = losses(straight), losses(tmp_path)
    assert len(got) == 20
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {i + 1}: plain {a:.7f} vs overlapped {b:.7f}"
    val = [m["val_loss"] for _, m in sorted(read_metrics(str(tmp_path)).items()) if "val_loss" in m]
    assert len(val) == 2 and val[-1] < val[0], val  # steps 7 and 14: not just before a save
    for it in ("iter_0000010", "iter_0000020"):
        a = _dcp_tensors(straight / "checkpoints" / it, tmp_path / "a.pt")
        b = _dcp_tensors(tmp_path / "checkpoints" / it, tmp_path / "b.pt")
        weights = [k for k in a if k.startswith(("decoder.", "embedding.", "output_layer.")) and torch.is_tensor(a[k])]
        assert len(weights) > 5
        for k in weights:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{it} {k}")


def test_gradient_accumulation_fusion_follows_the_unfused_run(straight, corpus, tiny_hf, tmp_path):
    """model.gradient_accumulation_fusion (weight gradients added into the fp32 main grads inside the
    GEMM, kernels/wgrad.py; on for CUDA by default) trains like megatron's unfused path: same losses
    to rounding over 20 steps, at TP=2 (split input and output dimensions)."""
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["dense"], tmp_path, "training.train_iters=20", "model.gradient_accumulation_fusion=true",
                                           "parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=0"))
    ref, got = losses(straight), losses(tmp_path)
    assert len(got) == 20
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 0.01 * abs(a), f"step {i + 1}: unfused {a:.6f} vs fused {b:.6f}"


def test_megatron_linear_accumulates_through_wgrad():
    """megatron's linear autograd function with gradient_accumulation_fusion, given kernels/wgrad.py:
    the weight gradient lands in main_grad (added to what was there, as over micro-batches), the
    input gradient is unchanged, and the layer flags the weight so the DDP hook adds nothing more."""
    from megatron_attnedit import fixes, platform
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce as linear

    platform.init_platform("cpu")
    assert "wgrad_accumulation" in fixes.applied()
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 8, generator=g))
    w.main_grad, w.grad_added_to_main_grad = torch.randn(6, 8, generator=g), False
    before = w.main_grad.clone()
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 6, generator=g)
    linear(x, w, None, gradient_accumulation_fusion=True, allreduce_dgrad=False, sequence_parallel=False).backward(dy)
    want = before + dy.reshape(-1, 6).t() @ x.detach().reshape(-1, 8)
    assert torch.allclose(w.main_grad, want, atol=1e-5) and w.grad_added_to_main_grad
    assert torch.allclose(x.grad, dy @ w.detach(), atol=1e-6)


@pytest.mark.parametrize("fusion", [False, True], ids=["plain", "wgrad-fusion"])
def test_megatron_linear_skips_the_unneeded_input_gradient(fusion):
    """With kernels/wgrad.py's dgrad skip, megatron's linear backward on an input that needs no
    gradient (stage 1's detached teacher hidden state) skips the input-gradient GEMM and gives the
    same weight and bias gradients as megatron's backward on an input that needs one."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_attnedit import fixes, platform
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce as linear

    platform.init_platform("cpu")
    assert {"wgrad_accumulation", "dgrad_skip"} <= set(fixes.applied())
    g = torch.Generator().manual_seed(0)
    x0, dy = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 6, generator=g)
    w0, b0 = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)

    def backward(needs_input_grad):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        if fusion:
            w.main_grad, w.grad_added_to_main_grad = torch.zeros(6, 8), False
        x = x0.clone().requires_grad_(needs_input_grad)
        y = linear(x, w, b, gradient_accumulation_fusion=fusion, allreduce_dgrad=False, sequence_parallel=False)
        with FlopCounterMode(display=False) as flops:
            y.backward(dy)
        return (w.main_grad if fusion else w.grad), b.grad, x.grad, flops.get_total_flops()

    w_ref, b_ref, x_grad, flops_ref = backward(True)
    w_got, b_got, none, flops_got = backward(False)
    assert x_grad is not None and none is None
    assert torch.allclose(w_got, w_ref, atol=1e-6) and torch.allclose(b_got, b_ref, atol=1e-6)
    assert torch.allclose(w_ref, dy.reshape(-1, 6).t() @ x0.reshape(-1, 8), atol=1e-5)
    assert flops_ref - flops_got == 2 * 15 * 6 * 8  # exactly the input-gradient GEMM is gone


@pytest.fixture(scope="module")
def moe_ep1(corpus, tiny_hf, tmp_path_factory):
    """6 steps of the qwen3-moe-debug model at EP=1 (SequentialMLP) on 2 data-parallel ranks."""
    run = tmp_path_factory.mktemp("moe_ep1")
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["moe"], run, "training.train_iters=6", "checkpoint.save_interval=0"))
    return run


OVERLAP = "parallel.overlap_grad_reduce=true parallel.overlap_param_gather=true parallel.ddp_bucket_size=3000"


@pytest.mark.parametrize("experts", ["model.moe_grouped_gemm=false", "model.moe_grouped_gemm=true", f"model.moe_grouped_gemm=true {OVERLAP}"],
                         ids=["sequential", "grouped", "grouped_overlapped"])
def test_moe_expert_parallel_training_matches_ep1(moe_ep1, corpus, tiny_hf, tmp_path, experts):
    """The qwen3-moe-debug model trained with its experts split over 2 ranks (EP=2) follows the
    EP=1 run step for step; the backward of megatron's expert-parallel token exchange runs on the
    CPU too (platform.py covers custom backwards). Also with the dense and the expert gradient
    buckets reduced, and the parameters gathered, overlapped."""
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["moe"], tmp_path, "training.train_iters=6", "checkpoint.save_interval=0",
                                           *experts.split(), "parallel.expert_model_parallel_size=2"))
    ref, got = losses(moe_ep1), losses(tmp_path)
    assert len(ref) == len(got) == 6 and ref[-1] < ref[0]
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {i + 1}: EP=1 {a:.6f} vs EP=2 {b:.6f}"


def test_resume_across_expert_implementations_is_refused_in_one_line(corpus, tiny_hf, tmp_path):
    """The optimizer state of grouped and sequential experts is laid out differently: a resume that
    switches model.moe_grouped_gemm stops with one line naming both ways out, before training."""
    torchrun("train_worker.py", *overrides(corpus, tiny_hf["moe"], tmp_path, "training.train_iters=4", "checkpoint.save_interval=2"))
    proc = torchrun("train_worker.py", *overrides(corpus, tiny_hf["moe"], tmp_path, "training.train_iters=6", "model.moe_grouped_gemm=true"), check=False)
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if "error:" in x and "moe_grouped_gemm" in x]
    # one line per rank, no traceback of ours (torchrun adds its own for the failed worker)
    assert errors and os.path.join(ROOT, "megatron_attnedit") not in proc.stderr, proc.stderr[-3000:]
    assert "model.moe_grouped_gemm=false" in errors[0] and "checkpoint.pretrained_checkpoint=" in errors[0], errors[0]
    assert max(read_metrics(str(tmp_path))) == 4  # nothing trained after the refusal
