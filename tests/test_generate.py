import json

import pytest
from typer.testing import CliRunner

from commands.main import app
from engram_edit.checkpoint import load_model
from engram_edit.errors import BadInputError
from engram_edit.generate import GenerationSettings, generate_ids, generate_text


def test_greedy_generation_is_deterministic_and_follows_argmax(tiny_model_dir):
    files, model = load_model(tiny_model_dir, device="cpu")
    ids = files.tokenizer.encode("The Milky Way")
    settings = GenerationSettings(max_new_tokens=5, stop_at_eos=False)
    first = list(generate_ids(model, ids, settings))
    assert first == list(generate_ids(model, ids, settings))
    import torch

    seq = list(ids)
    for token in first:
        logits = model(torch.tensor([seq])).logits[0, -1]
        assert int(logits.argmax()) == token
        seq.append(token)


def test_sampling_depends_on_the_seed_only(tiny_model_dir):
    files, model = load_model(tiny_model_dir, device="cpu")
    ids = files.tokenizer.encode("The")

    def run(seed):
        s = GenerationSettings(max_new_tokens=12, temperature=2.0, seed=seed, stop_at_eos=False)
        return list(generate_ids(model, ids, s))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_memory_off_changes_what_a_random_model_says(tiny_model_dir):
    files, model = load_model(tiny_model_dir, device="cpu")
    text = lambda memory: "".join(p for _, p in generate_text(  # noqa: E731
        model, files.tokenizer, "Princess of", GenerationSettings(max_new_tokens=8,
                                                                  memory=memory,
                                                                  stop_at_eos=False)))
    assert text(True) != text(False)


def test_generate_prints_prompt_and_completion_only(tiny_model_dir):
    result = CliRunner().invoke(app, ["generate", "Princess of", "--model", str(tiny_model_dir),
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Princess of")
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    as_json = CliRunner().invoke(app, ["generate", "Princess of", "--model",
                                       str(tiny_model_dir), "--max-new-tokens", "4", "--json"])
    record = json.loads(as_json.stdout)
    assert result.stdout == record["prompt"] + record["completion"] + "\n"
    assert len(record["tokens"]) == 4


def test_generate_rejects_bad_settings_with_exit_2(tiny_model_dir):
    result = CliRunner().invoke(app, ["generate", "x", "--model", str(tiny_model_dir),
                                      "--temperature", "-1"])
    assert result.exit_code == 2
    assert "--temperature: must be >= 0" in result.stderr
    with pytest.raises(BadInputError, match="prompt is empty"):
        files, model = load_model(tiny_model_dir, device="cpu")
        list(generate_ids(model, [], GenerationSettings()))
