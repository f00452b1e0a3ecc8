"""Logits parity against transformers' Qwen3 / Qwen3-MoE / Llama 3 in fp32 at TP=1 and at TP=2, PP=2 (EP=2 for the MoE)."""

import pytest
import torch

from conftest import torchrun
from megatron_attnedit.testing import hf_logits

TOL = 1e-4

LAYOUTS = [
    ("dense", 1, 1, 1, 1),
    ("moe", 1, 1, 1, 1),
    ("dense", 2, 1, 1, 2),
    ("dense", 1, 2, 1, 2),
    ("moe", 2, 1, 1, 2),
    ("moe", 1, 2, 1, 2),
    ("moe", 1, 1, 2, 2),
    ("llama", 1, 1, 1, 1),
    ("llama_untied", 1, 1, 1, 1),
    ("llama", 2, 1, 1, 2),
    ("llama", 1, 2, 1, 2),
]


@pytest.mark.parametrize("kind,tp,pp,ep,nproc", LAYOUTS, ids=lambda x: str(x))
def test_logits_match_transformers(tiny_hf, tmp_path, kind, tp, pp, ep, nproc):
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24))
    torch.save(tokens, tmp_path / "tokens.pt")
    ref = hf_logits(tiny_hf[kind], tokens)
    torchrun("parity.py", "--hf-dir", tiny_hf[kind], "--tokens", tmp_path / "tokens.pt", "--out", tmp_path / "out.pt",
             "--tp", tp, "--pp", pp, "--ep", ep, nproc=nproc)
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"max |megatron - HF| = {diff:.3e} at TP={tp} PP={pp} EP={ep}"
