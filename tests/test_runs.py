"""Run folders survive kills at the awkward moments: mid-append, mid-checkpoint, mid-finish."""

import os
import threading
import time

import pytest
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


def _run_with_checkpoints(tmp_path, monkeypatch, evaluated=(5, 6), saved=(5,)):
    """A run folder in a fresh cache with evaluation rows for ``evaluated`` and checkpoints at ``saved``."""
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    model, tokenizer = _tiny_model_and_tokenizer()
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    for step in evaluated:
        run.add_evaluation({"step": step, "reward": 0.5})
    for step in saved:
        run.save_checkpoint(step, model, tokenizer, {"rng": torch.get_rng_state()})
    return run, model, tokenizer


def test_the_previous_checkpoint_is_found_after_a_kill_mid_swap(tmp_path, monkeypatch):
    run, model, tokenizer = _run_with_checkpoints(tmp_path, monkeypatch)
    real_replace = os.replace

    def killed_after_moving_the_old_one_aside(src, dst):
        if dst == run.path / CHECKPOINT_DIR:
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_moving_the_old_one_aside)
    try:
        run.save_checkpoint(6, model, tokenizer, {})
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    folder, state = run.latest_checkpoint()
    assert state["step"] == 5 and folder.name == CHECKPOINT_DIR + ".old"
    assert (run.path / (CHECKPOINT_DIR + ".partial") / "trainer_state.pt").exists()  # complete, never trusted
    run.save_checkpoint(6, model, tokenizer, {})
    assert run.latest_checkpoint()[1]["step"] == 6
    run.finish(model, tokenizer)
    assert run.finished and not (run.path / CHECKPOINT_DIR).exists()


def _run_with_two_checkpoints(tmp_path, monkeypatch):
    return _run_with_checkpoints(tmp_path, monkeypatch, evaluated=(0, 5), saved=(0, 5))


def test_a_bit_flipped_checkpoint_is_reported_and_the_previous_one_used(tmp_path, monkeypatch, caplog):
    run, _, _ = _run_with_two_checkpoints(tmp_path, monkeypatch)
    assert run.latest_checkpoint()[1]["step"] == 5
    weights = run.path / CHECKPOINT_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="dpo_lab"):
        folder, state = run.latest_checkpoint()
    assert state["step"] == 0 and folder.name == CHECKPOINT_DIR + ".previous"
    assert "model.safetensors does not match the checksum" in caplog.text and str(weights.parent) in caplog.text


def test_a_truncated_trainer_state_is_detected(tmp_path, monkeypatch, caplog):
    run, _, _ = _run_with_two_checkpoints(tmp_path, monkeypatch)
    state = run.path / CHECKPOINT_DIR / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-7])
    with caplog.at_level("WARNING", logger="dpo_lab"):
        assert run.latest_checkpoint()[1]["step"] == 0
    assert "trainer_state.pt does not match the checksum" in caplog.text


def test_a_finished_run_that_lost_its_evaluations_is_trained_again(tmp_path, monkeypatch, caplog):
    run, model, tokenizer = _run_with_two_checkpoints(tmp_path, monkeypatch)
    run.add_evaluation({"step": 9, "reward": 0.7})
    run.finish(model, tokenizer)
    assert run.finished
    (run.path / "evaluations.csv").unlink()
    with caplog.at_level("WARNING", logger="dpo_lab"):
        assert not run.finished
    assert "evaluations.csv is missing" in caplog.text
    assert not (run.path / "final").exists()  # trained again from scratch: deterministic, the same rows


def test_evaluation_rows_keep_their_columns_and_integer_types(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    for step in (5, 0, 5):
        run.add_evaluation({"run_id": run.run_id, "seed": 0, "step": step, "reward": 0.5 + step, "n_prompts": 512})
    table = run.evaluations()
    assert table.columns.tolist() == ["run_id", "seed", "step", "reward", "n_prompts"]
    assert table["step"].tolist() == [0, 5] and table["reward"].tolist() == [0.5, 5.5]
    assert (table["seed"].dtype.kind, table["n_prompts"].dtype.kind) == ("i", "i")


def test_a_record_logged_after_a_cut_short_line_is_kept(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    run.log_metrics(1, {"loss": 0.7})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "lo')  # killed mid-append; the resumed run logs step 2 again, then 3
    run.log_metrics(2, {"loss": 0.6})
    run.log_metrics(3, {"loss": 0.5})
    with caplog.at_level("WARNING", logger="dpo_lab"):
        assert run.metrics()["loss"].tolist() == [0.7, 0.6, 0.5]
    assert "skipped 1 line(s)" in caplog.text


def _finished_run(tmp_path, monkeypatch):
    run, model, tokenizer = _run_with_two_checkpoints(tmp_path, monkeypatch)
    run.finish(model, tokenizer)
    assert run.finished
    return run


@pytest.mark.parametrize("damage, problem", [
    (lambda text: "", "is unreadable"),
    (lambda text: text[:-3], "cut short"),
    (lambda text: text.replace("0.5", "inf"), "not a finite number"),
    (lambda text: text.replace("0.5", "0.u", 1), "not a finite number"),  # a flipped byte
])
def test_a_damaged_evaluations_file_is_moved_aside_and_the_run_trained_again(tmp_path, monkeypatch, caplog,
                                                                             damage, problem):
    run = _finished_run(tmp_path, monkeypatch)
    path = run.path / "evaluations.csv"
    path.write_text(damage(path.read_text()))
    with caplog.at_level("WARNING", logger="dpo_lab"):
        assert not run.finished
        assert run.resume_point() is None  # nothing sound to resume from: step 0
    assert problem in caplog.text and "evaluations.csv.damaged" in caplog.text
    assert not path.exists() and (run.path / "evaluations.csv.damaged").exists()
    run.add_evaluation({"step": 0, "reward": 0.5})  # training again records its rows as usual
    assert run.evaluations()["step"].tolist() == [0]


def test_a_run_evaluated_on_one_prompt_has_no_standard_errors_and_is_still_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    model, tokenizer = _tiny_model_and_tokenizer()
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    for step in (0, 5):
        run.add_evaluation({"step": step, "reward": 0.5, "reward_se": float("nan"), "kl": 1.0, "kl_se": float("nan")})
    run.finish(model, tokenizer)
    assert run.sound_evaluations()[1] is None and run.finished


def test_an_unreadable_evaluations_file_is_named_when_read(tmp_path, monkeypatch):
    run = _finished_run(tmp_path, monkeypatch)
    (run.path / "evaluations.csv").write_text("")
    with pytest.raises(ValueError, match=r"evaluations.csv is unreadable"):
        run.evaluations()


def test_a_finished_run_whose_final_model_changed_is_trained_again(tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file, save_file

    run = _finished_run(tmp_path, monkeypatch)
    weights = run.path / "final" / "model.safetensors"
    save_file({name: tensor * 0.3 for name, tensor in load_file(weights).items()}, weights)  # finite, but wrong
    with caplog.at_level("WARNING", logger="dpo_lab"):
        assert not run.finished
    assert "its final model: model.safetensors does not match the checksum" in caplog.text
    assert not (run.path / "final").exists() and not (run.path / "DONE").exists()


def test_a_second_process_waits_for_the_run_the_first_is_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    run = Run("ci", "dpo", "beta0.1", {"beta": 0.1})
    order = []

    def second():
        with Run("ci", "dpo", "beta0.1", {"beta": 0.1}).exclusive():
            order.append("second")

    with caplog.at_level("WARNING", logger="dpo_lab"):
        with run.exclusive():
            waiting = threading.Thread(target=second)
            waiting.start()
            while "another process holds it" not in caplog.text:  # the second one reports, then blocks
                time.sleep(0.01)
            order.append("first")
        waiting.join()
    assert order == ["first", "second"]
