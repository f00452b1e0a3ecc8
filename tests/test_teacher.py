"""The committed teachers (megatron_attnedit/assets/teachers/*) are genuinely trained and are what
their model cards say. For each (skipped, with the reason, while a teacher is not committed):

* the HF directory is complete: weights at most 16 MB, tokenizer files that load offline and
  round-trip code, a card (README.md + teacher_card.json) for the same architecture;
* its held-out loss on THIS interpreter's valid split, by the card's bounded protocol (first 512
  positions of every valid file, ~15K tokens, about 5 s on CPU), is
  - within MARGIN_NATS of the card's figure on the valid files both interpreters have (the card was
    measured on the training interpreter's standard library, whose file set and files differ a little
    from this one's),
  - within IDENTICAL_NATS of the card on the files whose text is identical here (numerics only:
    fp32 on another device), when at least MIN_IDENTICAL files are,
  - below half of ln(vocab) and below half the loss of an untrained model of the same shape.

Always run: the two architectures fit the 16 MB budget (and the card's active-parameter arithmetic
is right); CLI mistakes end in one ``error:`` line.
"""

import json
import math
import os

import pytest

from megatron_attnedit import teacher
from megatron_attnedit.data import corpus

MARGIN_NATS = 0.15
"""Card vs here, on the valid files both interpreters have. Measured with a partly trained teacher whose card
came from CPython 3.11.7 (pyenv): 3.12.1 +0.0002, 3.10.13 -0.008, Debian's 3.11 (30 valid files)
-0.035, 3.13.0 (31 files, 12 identical) +0.064 nats."""
IDENTICAL_NATS = 0.01
MIN_IDENTICAL = 5
MAX_BYTES = 16 * 10**6


@pytest.fixture(scope="module", params=sorted(teacher.NAMES))
def committed(request):
    kind = request.param
    path = teacher.bundled_teacher(kind)
    if path is None:
        pytest.skip(f"no committed {kind} teacher at {os.path.join(teacher.ASSETS_DIR, teacher.NAMES[kind])} "
                    f"(made by `bash launch/train_teacher.sh {kind} DIR` on a GPU, then committed)")
    card = json.load(open(os.path.join(path, teacher.CARD_JSON)))
    cfg = json.load(open(os.path.join(path, "config.json")))
    return kind, path, card, cfg


@pytest.fixture(scope="module")
def local_eval(committed):
    kind, path, card, cfg = committed
    files = corpus.split_files("valid")
    model, tok = teacher.load_model(path)
    proto = card["heldout"]["protocol"]
    assert (proto["seq_len"], proto["max_windows_per_file"]) == (teacher.PROTOCOL["seq_len"], teacher.PROTOCOL["max_windows_per_file"])
    return teacher.heldout_loss(model, tok, files, proto["seq_len"], proto["max_windows_per_file"]), files, tok


def test_directory_is_complete(committed):
    kind, path, card, cfg = committed
    names = set(os.listdir(path))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", teacher.CARD_JSON} <= names, names
    weights = [n for n in names if n.endswith(".safetensors")]
    assert weights and not any(n.endswith((".bin", ".pt")) for n in names)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in weights)
    assert size <= MAX_BYTES, f"{size / 1e6:.1f} MB of weights"
    assert card["parameters"]["safetensors_bytes"] == size
    assert cfg["model_type"] == ("qwen3" if kind == "dense" else "qwen3_moe")
    for key, value in teacher.ARCHITECTURES[kind].items():
        if key not in ("model_type", "rope_theta", "num_experts"):
            assert cfg[key] == value, key
    readme = open(os.path.join(path, "README.md")).read()
    assert f"{card['heldout']['full']['loss']:.4f}" in readme and card["command"] in readme


def test_tokenizer_loads_offline_and_round_trips(committed, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kind, path, card, cfg = committed
    from megatron_attnedit.data import tokenizer

    tok = tokenizer.load_hf(path)
    assert len(tok) == cfg["vocab_size"] and tok.eos_token_id == cfg["eos_token_id"]
    text = "class A:\n    def f(self, x):\n\treturn {'<s>': x}  # caf\u00e9  \n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_heldout_loss_matches_the_card(committed, local_eval):
    kind, path, card, cfg = committed
    result, files, _ = local_eval
    proto = card["heldout"]["protocol"]
    cmp = teacher.compare_on_common_files(proto["files"], result["files"])
    msg = (f"{kind}: here (Python {corpus.interpreter()['version']}, {len(files)} valid files) {result['loss']:.4f}, "
           f"card (Python {card['interpreter']['version']}, {len(proto['files'])} files) {proto['loss']:.4f}; {cmp}")
    print(msg)
    # Compared on the files both standard libraries have: whole-split figures also differ by which
    # files a packager ships (the bundled cards come from Debian's CPython 3.12.3, 27 valid files; a
    # pyenv 3.11.7 has 33, and its 6 extra files alone move the whole-split loss by 0.23 nats).
    assert cmp["common_files"] >= MIN_IDENTICAL, msg
    assert abs(cmp["local_common"] - cmp["card_common"]) <= MARGIN_NATS, msg
    if cmp["identical_files"] >= MIN_IDENTICAL:
        assert abs(cmp["local_identical"] - cmp["card_identical"]) <= IDENTICAL_NATS, msg


def test_far_below_an_untrained_model(committed, local_eval):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, path, card, cfg = committed
    result, files, tok = local_eval
    assert result["loss"] < 0.5 * math.log(cfg["vocab_size"]), result["loss"]
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    few = files[:4]
    proto = card["heldout"]["protocol"]
    base = teacher.heldout_loss(untrained, tok, few, proto["seq_len"], proto["max_windows_per_file"])["loss"]
    trained = sum(result["files"][p][0] for p, _ in few) / sum(result["files"][p][1] for p, _ in few)
    assert base > 0.9 * math.log(cfg["vocab_size"]), base
    assert trained < 0.5 * base, (trained, base)


@pytest.mark.parametrize("kind", sorted(teacher.ARCHITECTURES))
def test_architectures_fit_the_budget(kind, tmp_path):
    """The shapes train_teacher.sh builds: bf16 weights at most 16 MB; active-parameter arithmetic."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = teacher.hf_config(kind, 4096, {"bos": 1, "eos": 2, "pad": 3})
    from megatron_attnedit import families

    families.check_hf_config(cfg)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    counts = teacher.parameter_counts(str(tmp_path), cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["safetensors_bytes"] <= MAX_BYTES, counts
    if kind == "moe":
        experts = [p for n, p in model.named_parameters() if ".experts." in n]
        per_layer_expert = sum(p.numel() for p in experts) // sum(families.moe_layer_pattern(cfg)) // 8
        assert counts["active"] == counts["total"] - sum(families.moe_layer_pattern(cfg)) * 6 * per_layer_expert
    else:
        assert counts["active"] == counts["total"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = teacher.main(["eval", "--hf-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "config.json" in err and "\n" not in err
    rc = teacher.main(["datasets", "--corpus", str(tmp_path), "--tokenizer-dir", str(tmp_path), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "manifest.json" in err and "\n" not in err
