"""Run folders survive kills at the awkward moments: mid-append, mid-checkpoint, mid-finish."""

import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab.runs import CHECKPOINT_DIR, Run


def _tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(20)}, unk_token="t1")), eos_token="t0")
    return model, tokenizer


def test_a_partial_last_metrics_line_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    run.log_metrics(1, {"loss": 0.7})
    run.log_metrics(2, {"loss": 0.6})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # killed mid-append
    assert run.metrics()["step"].tolist() == [1, 2]


def test_a_staged_checkpoint_is_found_and_finish_marks_done_before_cleanup(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    model, tokenizer = _tiny_model_and_tokenizer()
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    run.save_checkpoint(5, model, tokenizer, {"rng": torch.get_rng_state()})
    os.replace(run.path / CHECKPOINT_DIR, run.path / (CHECKPOINT_DIR + ".next"))  # killed before the rename
    folder, state = run.latest_checkpoint()
    assert state["step"] == 5 and folder.name == CHECKPOINT_DIR + ".next"
    run.save_checkpoint(6, model, tokenizer, {})
    assert run.latest_checkpoint()[1]["step"] == 6
    run.finish(model, tokenizer)
    assert run.finished and not (run.path / CHECKPOINT_DIR).exists()
