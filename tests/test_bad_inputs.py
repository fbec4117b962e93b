"""Bad inputs a new user can cause: each gets one clear line before any long work, or a correct recovery.

The README's "Bad inputs" table lists them with what each now gets; this file checks the ones the
command line sees. The trainers' guards, the cache checks and the corpus checks have their tests
beside their modules (test_dpo, test_ppo, test_runs, test_helpers, test_corpus).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from dpo_lab import cli, lm, profiles, storage
from dpo_lab.frontier import write_results


def one_error_line(capsys, command: str) -> str:
    """stderr of the last command, checked to be a single ``dpo-lab <command>: error:`` line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"dpo-lab {command}: error: ")
    return err


@pytest.mark.parametrize("argv, expected", [
    (["prepare", "--device", "nonsense"], "device 'nonsense' is not"),
    (["train", "dpo", "--device", "meta"], "device 'meta' is not"),
    (["frontier", "--methods", ""], "no methods chosen"),
    (["train", "ppo", "--target-kl", "0"], "target_kl must be a finite number > 0"),
    (["train", "ppo", "--target-kl", "3", "--init-kl-coef", "0"], "would stay 0"),
    (["train", "dpo", "--beta", "inf"], "beta"),
    (["prepare", "--policy", "./no-such-model"], "policy './no-such-model': no such file or folder"),
])
def test_bad_options_get_one_line_before_any_work(argv, expected, capsys, isolated_home):
    assert cli.main(argv) == 2
    assert expected in one_error_line(capsys, argv[0])
    assert not (isolated_home / "tiny").exists()  # nothing was built


def test_an_unwritable_cache_gets_one_line(tmp_path, monkeypatch, capsys):
    """Running as root ignores permissions, so the cache home is made a file: it cannot hold folders."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("DPO_LAB_HOME", str(home))
    assert cli.main(["prepare", "--profile", "ci"]) == 1
    err = one_error_line(capsys, "prepare")
    assert f"cannot write the cache folder {home / 'ci'}" in err and "$DPO_LAB_HOME" in err


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(ValueError, match="device 'nonsense'"):
        cli.main(["prepare", "--device", "nonsense", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV_VAR, "1")
    with pytest.raises(ValueError, match="device 'nonsense'"):
        cli.main(["prepare", "--device", "nonsense"])


def test_the_results_table_is_byte_stable(tmp_path):
    """The first write (after a concat with an empty, object-typed table) and a rewrite give the same bytes."""
    rows = pd.DataFrame({"profile": ["ci"], "run_id": ["dpo/x"], "method": ["dpo"], "hyperparameter_name": ["beta"],
                         "hyperparameter": [0.1], "seed": [0], "step": [0], "reward": [0.123456789],
                         "reward_se": [0.01], "kl": [1 / 3], "kl_se": [0.0], "kl_sample": [0.0], "length": [22.5],
                         "n_prompts": [64], "wall_s": [12.3456789]})
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    write_results(pd.concat([pd.DataFrame(columns=rows.columns), rows], ignore_index=True), first)
    write_results(pd.read_csv(first), second)
    assert first.read_bytes() == second.read_bytes()
    assert "0.123457" in first.read_text()


@pytest.fixture()
def local_stand_ins(ci_world, tmp_path):
    """A local causal LM and a local sentiment classifier, saved with ``save_pretrained`` (no hub)."""
    _, tokenizer = ci_world.load_policy("cpu")
    torch.manual_seed(0)
    common = {"vocab_size": len(tokenizer), "n_positions": 512, "n_embd": 16, "n_layer": 1, "n_head": 2,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "bos_token_id": tokenizer.eos_token_id}
    policy, classifier = tmp_path / "my-policy", tmp_path / "my-classifier"
    lm.write_causal_lm(GPT2LMHeadModel(GPT2Config(**common)), tokenizer, policy)
    GPT2ForSequenceClassification(GPT2Config(**common, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                             label2id={"NEGATIVE": 0, "POSITIVE": 1})).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    return policy, classifier


def test_prepare_gpt2_offline_from_local_corpus_policy_and_classifier(imdb_sample, local_stand_ins, tmp_path,
                                                                      monkeypatch, capsys):
    """The hub profile, with every source local: the IMDb sample, a local policy and a local classifier.

    The profile is the real ``gpt2`` one but for ``sft_max_steps`` (8, not its 125 steps over the
    sample), to keep the test at seconds: bf16 autocast on a CPU is slow.
    """
    policy, classifier = local_stand_ins
    gpt2 = profiles.PROFILES["gpt2"]
    monkeypatch.setitem(profiles.PROFILES, "gpt2", gpt2.replace(policy=dataclasses.replace(gpt2.policy, sft_max_steps=8)))
    AcceleratorState._reset_state(reset_partial_state=True)  # as in a new process: this profile trains in bf16
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DPO_LAB_GROUND_TRUTH", str(classifier))  # an environment variable works as well
    assert cli.main(["prepare", "--profile", "gpt2", "--device", "cpu", "--corpus", str(imdb_sample),
                     "--policy", str(policy)]) == 0
    captured = capsys.readouterr()
    assert f"policy (pi_SFT = pi_ref): {tmp_path / 'cache' / 'gpt2'}" in captured.out
    assert f"ground truth: {classifier}" in captured.out
    assert "fewer than the 25000 the profile asks for" in captured.err  # 4,000 reviews: said, not silent
    corpus_config = storage.read_json(next((tmp_path / "cache" / "gpt2").glob("corpus-*")) / "config.json")
    assert corpus_config["corpus"]["source"].startswith(f"local:{imdb_sample}@")
    AcceleratorState._reset_state(reset_partial_state=True)
