"""Quality against distance (eval/distance.py, eval/retrieval.py) on the bundled teacher and a
sliding-window copy of it (stock transformers Qwen3, the teacher's weights, every layer
``sliding_attention``): loss by position in the window and the retrieval probe, through
``python -m megatron_attnedit.evaluate`` and piece by piece."""

import json
import os
import sysconfig

import numpy as np
import pytest
import torch

from megatron_attnedit import evaluate, teacher
from megatron_attnedit.eval import distance, perplexity, retrieval
from megatron_attnedit.errors import EvalError

TEACHER = teacher.bundled_teacher("dense")
pytestmark = pytest.mark.skipif(TEACHER is None, reason="the bundled dense teacher is not in this checkout")
W = 32  # the windowed copy's window
STDLIB = [os.path.join(sysconfig.get_paths()["stdlib"], f) for f in ("argparse.py", "textwrap.py", "ftplib.py")]


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_attnedit.training.data import Tokenizer

    base = tmp_path_factory.mktemp("distance")
    cfg = AutoConfig.from_pretrained(TEACHER)
    cfg.use_sliding_window, cfg.sliding_window = True, W
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    AutoModelForCausalLM.from_pretrained(TEACHER, config=cfg, dtype=torch.float32).save_pretrained(str(base / "win"))
    tok = Tokenizer(TEACHER)
    data = perplexity.load_eval_tokens(STDLIB, TEACHER, 4096)
    return dict(base=str(base), win=str(base / "win"), tok=tok, tokens=data["tokens"])


def test_buckets_partition_the_scored_tokens(bundled):
    """Per-position sums from the perplexity pass: every scored token in exactly one bucket; the
    token-weighted mean of the bucket losses is the mean NLL; a position's mean is the directly
    computed cross-entropy at that position (stride < window: later windows score their tail only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tokens = bundled["tokens"][:400]
    wins = perplexity.make_windows(len(tokens), 64, 24)
    got = perplexity.perplexity(lambda ids: model(input_ids=ids).logits, tokens, wins, 64, batch_size=3)
    rows = distance.buckets(got["position_nll"], distance.edges(64, [W, 48]))
    assert [r["hi"] for r in rows] == [1, 2, 4, 8, 16, 32, 48, 64]
    assert sum(r["tokens"] for r in rows) == got["scored_tokens"] == 64 + 24 * (len(wins) - 1)
    weighted = sum(r["tokens"] * r["mean_nll"] for r in rows if r["tokens"]) / got["scored_tokens"]
    assert weighted == pytest.approx(got["mean_nll"], rel=1e-12)
    assert [r["tokens"] for r in rows][:6] == [1, 1, 2, 4, 8, 16] and rows[6]["tokens"] == 16 + 8 * (len(wins) - 1)
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        ce = torch.stack([torch.nn.functional.cross_entropy(model(input_ids=x[b : b + 64][None]).logits[0].float(), x[b + 1 : b + 65], reduction="none")
                          for b, _ in wins])
    s, c = got["position_nll"]["sum"], got["position_nll"]["count"]
    assert s[5] / c[5] == pytest.approx(float(ce[0, 5]), rel=1e-5)  # only the first window scores position 5
    assert s[63] / c[63] == pytest.approx(float(ce[:, 63].double().mean()), rel=1e-5)


def test_probe_prompts(bundled):
    """Every prompt has the context's length, holds the key line once as a whole line, ends with
    the statement repeated up to the value, and the value starts exactly ``distance`` tokens
    before the last prompt token; same seed, same prompts."""
    tok = bundled["tok"]
    args = (bundled["tokens"], tok.eod, tok.tokenize, tok.decode, 256, [24, 100, 231], 3)
    trials = retrieval.build_trials(*args, seed=5)
    assert len(trials) == 9 and len({t.name for t in trials}) == 9
    for t in trials:
        text = tok.decode(t.ids.tolist())
        assert len(t.ids) == 256 and text.endswith(f'\n{t.name} = "'), text[-80:]
        assert text.count(f'{t.name} = "{t.key}"\n') == 1 and text.count(t.name) == 2
        value_at = 256 - 1 - t.distance
        assert tok.decode(t.ids[value_at:].tolist()).startswith(f'{t.key}"\n')
        assert tok.decode(t.ids[:value_at].tolist()).endswith(f'{t.name} = "')
    again = retrieval.build_trials(*args, seed=5)
    assert all(np.array_equal(a.ids, b.ids) and a.key == b.key for a, b in zip(trials, again))
    assert [t.key for t in retrieval.build_trials(*args, seed=6)] != [t.key for t in trials]
    with pytest.raises(EvalError, match="must be in"):
        retrieval.build_trials(*args[:5], [240], 1, seed=0)


def _window_copier(window: int, ngram: int = 4):
    """What an induction head in a sliding-window layer can do: continue the latest earlier
    occurrence of the last ``ngram`` tokens, copying only a token among the last ``window``
    positions (distance < window)."""

    def complete(ids, n):
        out = []
        for row in ids.tolist():
            seq = list(row)
            for _ in range(n):
                nxt, last = 0, len(seq) - 1
                for p in range(last, max(ngram, last - window + 1) - 1, -1):  # p: the token to copy
                    if seq[p - ngram : p] == seq[-ngram:]:
                        nxt = seq[p]
                        break
                seq.append(nxt)
            out.append(seq[len(row) :])
        return torch.tensor(out)

    return complete


def test_probe_scores_a_window_exactly(bundled):
    """A copier that sees the last 40 positions recalls every key at distance 39 and none at 40:
    the distance is exact, and exact match / per-character accuracy count what was generated."""
    tok = bundled["tok"]
    trials = retrieval.build_trials(bundled["tokens"], tok.eod, tok.tokenize, tok.decode, 128, [24, 39, 40, 100], 3, seed=1)
    res = retrieval.run(_window_copier(40), trials, tok.decode, batch_size=5)
    got = {r["distance"]: (r["exact"], r["per_char"]) for r in res["per_distance"]}
    assert got[24] == got[39] == (1.0, 1.0) and got[40][0] == got[100][0] == 0.0
    assert all(r["answer"].startswith(r["key"] + '"') for r in res["trials"] if r["distance"] < 40)
    assert retrieval.score("73915", "73915") == dict(exact=1.0, per_char=1.0)
    assert retrieval.score('73815"x', "73915") == dict(exact=0.0, per_char=0.8)
    assert retrieval.score("739150", "73915")["exact"] == 0.0  # the value must end where the key does


def test_evaluate_windowed_teacher(bundled):
    """The whole command on the bundled teacher and its sliding-window copy: identical loss up to
    W tokens of context, a different one beyond; the beyond-W figure is the buckets' above W; the
    probe's table, plots and the same prompts for both models."""
    out = os.path.join(bundled["base"], "report")
    argv = ["--teacher", TEACHER, "--student", f"win={bundled['win']}", "--data", *STDLIB, "--report-dir", out, "--device", "cpu",
            "--seq-length", "128", "--max-tokens", "512", "--decode-tokens", "4", "--probe-context", "128", "--probe-distances", "24,48,100",
            "--probe-trials", "2"]
    assert evaluate.main(argv) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    md = open(os.path.join(out, "report.md")).read()
    bp = res["by_position"]
    assert bp["windows"] == {"win": W} and W in bp["edges"]
    for row in bp["models"]["win"]:
        if row["hi"] <= W:
            assert row["ratio"] == pytest.approx(1.0, abs=1e-5), row
        else:
            assert abs(row["ratio"] - 1.0) > 1e-3, row
    b = bp["beyond_window"]["win"]
    above = [r for r in bp["models"]["win"] if r["lo"] >= W]
    assert b["tokens"] == sum(r["tokens"] for r in above) == 4 * (128 - W)
    assert b["student_nll"] == pytest.approx(sum(r["tokens"] * r["mean_nll"] for r in above) / b["tokens"], rel=1e-12)
    assert b["within"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    teacher_probe, win_probe = (m["probe"] for m in res["models"])
    assert [t["key"] for t in teacher_probe["trials"]] == [t["key"] for t in win_probe["trials"]]
    assert [r["distance"] for r in win_probe["per_distance"]] == [24, 48, 100] == res["probe"]["distances"]
    for f in ("loss_by_position.png", "retrieval_probe.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    assert "## Loss by position in the window" in md and "| 17-32 ← W (win) | 64 |" in md
    assert "## Retrieval probe" in md and "| 48 (≥ W of win) |" in md and "## Students against the teacher" in md
    assert "goal" not in md.lower()
