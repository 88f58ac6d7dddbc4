import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_TOKENIZER, tiny_config
from engram_edit.checkpoint import load_model
from engram_edit.errors import BadInputError
from engram_edit.tokenizer import EngramTokenizer
from engram_edit.train import TrainSettings, train

TEXTS = [
    "The Milky Way is the galaxy that includes the Solar System.",
    "Alexander the Great was a king of the ancient Greek kingdom of Macedon.",
    "The Ottoman Empire was an empire that controlled much of Southeast Europe.",
    "Sri Lanka is an island country in South Asia.",
    "Princess of Wales is a title held by the wife of the Prince of Wales.",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus"
    path.mkdir()
    for split, reps in (("train", 30), ("valid", 4)):
        lines = [json.dumps({"text": t, "source": "test"}) for t in TEXTS * reps]
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(TINY_TOKENIZER, path / "tokenizer.json")
    return path


def _settings(**kw):
    base = dict(tokens=8 * 4 * 32, batch_size=4, seq_len=32, eval_every=4, eval_batches=1,
                warmup_steps=2, bf16=False, seed=3)
    base.update(kw)
    return TrainSettings(**base)


def _weights(path):
    _, model = load_model(path, device="cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_with_tokens_and_seed_is_reproducible(tmp_path, corpus):
    tok = EngramTokenizer.from_file(TINY_TOKENIZER)
    first = train(corpus, tmp_path / "a", tiny_config(), tok, _settings())
    second = train(corpus, tmp_path / "b", tiny_config(), tok, _settings())
    assert first.steps == second.steps == 8
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.history and first.history[-1]["valid_loss"] == second.history[-1]["valid_loss"]
    assert first.train_loss < 6.3  # below ln(500): it learned something in 8 steps


def test_resume_continues_to_the_same_weights(tmp_path, corpus):
    tok = EngramTokenizer.from_file(TINY_TOKENIZER)
    straight = train(corpus, tmp_path / "a", tiny_config(), tok, _settings())

    class Stop(Exception):
        pass

    def stop_after_checkpoint(p):
        if p.event == "checkpoint" and p.step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(corpus, tmp_path / "b", tiny_config(), tok, _settings(checkpoint_seconds=0),
              on_progress=stop_after_checkpoint)
    assert (tmp_path / "b" / ".train" / "state.pt").is_file()
    resumed = train(corpus, tmp_path / "b", tiny_config(), tok, _settings(), resume=True)
    assert resumed.steps == straight.steps
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / ".train").exists()


def test_training_logs_validation_with_memory_on_and_off(tmp_path, corpus):
    tok = EngramTokenizer.from_file(TINY_TOKENIZER)
    result = train(corpus, tmp_path / "a", tiny_config(), tok, _settings())
    last = result.history[-1]
    assert last["valid_loss"] != last["valid_loss_no_memory"]
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 8 and record["settings"]["seed"] == 3


def test_bad_settings_and_existing_output_are_refused(tmp_path, corpus):
    tok = EngramTokenizer.from_file(TINY_TOKENIZER)
    with pytest.raises(BadInputError, match="exactly one of --tokens or --minutes"):
        train(corpus, tmp_path / "a", tiny_config(), tok, _settings(minutes=1.0))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(BadInputError, match="already exists and is not empty"):
        train(corpus, tmp_path / "busy", tiny_config(), tok, _settings())
    with pytest.raises(BadInputError, match="nothing to resume"):
        train(corpus, tmp_path / "new", tiny_config(), tok, _settings(), resume=True)


def test_train_command_writes_a_loadable_model(tmp_path, corpus):
    from commands.main import app

    (tmp_path / "cfg.json").write_text(tiny_config().to_json())
    result = CliRunner().invoke(app, [
        "train", "--corpus", str(corpus), "--out", str(tmp_path / "m"), "--config",
        str(tmp_path / "cfg.json"), "--tokens", "512", "--batch-size", "4", "--seq-len", "32",
        "--no-bf16", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["steps"] == 4
    files, _ = load_model(tmp_path / "m", device="cpu")
    assert files.config.engram_num_embeddings is not None


def test_init_starts_from_the_given_models_weights(tmp_path, corpus):
    tok = EngramTokenizer.from_file(TINY_TOKENIZER)
    first = train(corpus, tmp_path / "a", tiny_config(), tok, _settings())
    start = _weights(tmp_path / "a")
    seen = {}

    def first_loss(p):
        seen.setdefault("loss", p.loss)

    train(corpus, tmp_path / "b", tiny_config(), tok, _settings(init=str(tmp_path / "a")),
          on_progress=first_loss)
    fresh = {}
    train(corpus, tmp_path / "c", tiny_config(), tok, _settings(),
          on_progress=lambda p: fresh.setdefault("loss", p.loss))
    assert seen["loss"] < fresh["loss"]  # the first step already knows what run "a" learned
    assert first.train_loss < fresh["loss"]
    moved = _weights(tmp_path / "b")
    assert any(not torch.equal(start[k], moved[k]) for k in start)


def test_init_with_another_geometry_is_refused(tmp_path, corpus):
    tok = EngramTokenizer.from_file(TINY_TOKENIZER)
    train(corpus, tmp_path / "a", tiny_config(), tok, _settings())
    with pytest.raises(BadInputError, match="has shape"):
        train(corpus, tmp_path / "b", tiny_config(hidden_size=48), tok,
              _settings(init=str(tmp_path / "a")))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
