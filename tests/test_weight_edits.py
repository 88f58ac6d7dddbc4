"""bench/weight_edits.py: the MLP-weight baselines the patch benchmark compares row edits with.
On the bundled model: each raises the target's log-likelihood of the facts it edits, rounds the
edited matrix to its stored dtype, counts what changed, and ``restore`` gives the model back
exactly."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_edit.checkpoint import load_model
from engram_edit.edit.facts import read_facts
from engram_edit.eval import heldout_windows
from engram_edit.paths import bundled_heldout_file, bundled_model_dir
from engram_edit.train import tokenize_texts

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import weight_edits  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    files, model = load_model(bundled_model_dir(), device="cpu", placement="gpu")
    facts = read_facts(ROOT / "fixtures" / "facts" / "counterfact.jsonl")[:8]
    return files, model, facts


def _nll(model, tokenizer, facts) -> float:
    enc = weight_edits.encode(facts, tokenizer)
    with torch.no_grad():
        return float(weight_edits._target_nll(model, enc, torch.arange(len(facts))))


def _edit(method, files, model, facts):
    tok = files.tokenizer
    if method == "ft_l":
        return weight_edits.ft_l(model, tok, facts, 0, torch.bfloat16, norm_constraint=5e-3)
    stream = np.asarray(tokenize_texts(bundled_heldout_file(), tok))
    moment = weight_edits.key_moment(model, 2, heldout_windows(stream, 64, 128))
    return weight_edits.memit(model, tok, facts, 2, torch.bfloat16, moment, lam=100.0)


@pytest.mark.parametrize("method", ["ft_l", "memit"])
def test_a_weight_edit_moves_the_targets_and_restore_undoes_it(bundled, method):
    files, model, facts = bundled
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _nll(model, files.tokenizer, facts)
    edit, original = _edit(method, files, model, facts)
    weight = model.layers[edit.layer].mlp.down_proj.weight
    after = _nll(model, files.tokenizer, facts)
    assert after < before - 0.5
    assert torch.equal(weight, weight.to(torch.bfloat16).float())  # as a saved model holds it
    assert 0 < edit.changed_bytes <= edit.matrix_bytes == weight.numel() * 2
    changed = int((weight.to(torch.bfloat16) != original.to(torch.bfloat16)).sum())
    assert edit.changed_bytes == 2 * changed
    weight_edits.restore(model, edit.layer, original)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen


def test_the_subject_key_is_read_at_the_subjects_last_prompt_token(bundled):
    files, _, facts = bundled
    enc = weight_edits.encode(facts[:2], files.tokenizer)
    for i, fact in enumerate(facts[:2]):
        ids = enc.ids[i].tolist()
        last = int(enc.subject_last[i])
        text = files.tokenizer.tokenizer.decode(ids[:last + 1])
        assert text.rstrip().endswith(fact.subject.split()[-1][-3:])
        assert not enc.scored[i, :last].any()  # prompt positions before the target: unscored
