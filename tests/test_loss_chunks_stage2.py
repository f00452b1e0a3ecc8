"""Stage 2 through megatron's schedule (workers/distill_run.py) with the vocabulary-sized loss work in
token chunks: the same per-step KL and CE as the whole micro-batch at once.

fp32 on CPU; tolerance 1e-6 relative (measured: equal to the last bit). At TP=1 every step is
compared (the gradients must agree too, or the later steps would not). TP=2 is compared at step 1
only: its later steps follow the model's own TP numerics through Adam (1e-4 apart with or without
chunks); the losses' TP=2 gradients are checked in test_distill_losses.py.
"""

import json

import pytest
import torch

from conftest import torchrun

MLA = {"kv_lora_rank": 32, "init": "random"}


def stage2(tmp_path, hf_dir, options, nproc=1, tp=1):
    out = tmp_path / f"run{len(list(tmp_path.glob('run*.pt')))}.pt"
    torchrun("distill_run.py", "--hf-dir", hf_dir, "--out", out, "--stage", 2, "--stage2-options", json.dumps(options),
             "--target", "mla", "--target-options", json.dumps(MLA), "--steps", 3, "--data-pool", 2, "--lr", 3e-3,
             "--tp", tp, nproc=nproc)
    return torch.load(out)["metrics"]


def _same(got, ref, steps):
    assert len(got) == len(ref) == 3
    for step in range(steps):
        for k in ("stage2/kl", "stage2/ce"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-6), (step, k, got[step][k], ref[step][k])


def test_stage2_chunked_equals_whole_tp1_and_tp2(tiny_hf, tmp_path):
    base = {"ce_weight": 0.5, "temperature": 2.0}
    whole = stage2(tmp_path, tiny_hf["dense"], {**base, "loss_chunk_tokens": 0})
    # seq 32 x micro-batch 2: 4 tokens per chunk = 2 positions, 16 chunks per micro-batch
    _same(stage2(tmp_path, tiny_hf["dense"], {**base, "loss_chunk_tokens": 4}), whole, steps=3)
    _same(stage2(tmp_path, tiny_hf["dense"], {**base, "loss_chunk_tokens": 6}, nproc=2, tp=2), whole, steps=1)


def test_chunk_option_is_checked_for_stage2_and_lm():
    from megatron_attnedit.errors import ConfigError
    from megatron_attnedit.distill.stage2 import check_stage2_options
    from megatron_attnedit.training.objective import LMObjective

    assert check_stage2_options({})["loss_chunk_tokens"] is None
    assert check_stage2_options({"loss_chunk_tokens": 1024})["loss_chunk_tokens"] == 1024
    assert LMObjective({"loss_chunk_tokens": 0}).options["loss_chunk_tokens"] == 0
    for bad in (-1, 2.5, "auto", True):
        for check in (check_stage2_options, LMObjective):
            with pytest.raises(ConfigError, match="loss_chunk_tokens must be null"):
                check({"loss_chunk_tokens": bad})
