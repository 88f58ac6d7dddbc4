import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from engram_edit.checkpoint import build_model, describe_model, open_model, table_name
from engram_edit.dtypes import decode, encode
from engram_edit.errors import BadInputError, MismatchError


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_saved_and_loaded_model_is_bit_identical(tmp_path):
    model, _ = make_tiny_model(tmp_path / "m")
    loaded = build_model(open_model(tmp_path / "m"), device="cpu")
    before, after = _state(model), _state(loaded)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    ids = torch.randint(0, 500, (2, 9))
    assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)


def test_fp8_tables_load_as_their_dequantized_values(tmp_path):
    model, _ = make_tiny_model(tmp_path / "m", table_dtype="float8_e4m3", engram_head_dim=32)
    files = open_model(tmp_path / "m")
    assert files.tensors[table_name(0)].dtype == "F8_E4M3"
    loaded = build_model(files, device="cpu")
    rows = model.state_dict()[table_name(0)].numpy()
    expected = decode("float8_e4m3", *encode("float8_e4m3", rows))
    np.testing.assert_array_equal(loaded.state_dict()[table_name(0)].numpy(), expected)


def test_derived_keys_are_written_and_checked(tmp_path):
    make_tiny_model(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    files = open_model(tmp_path / "m")
    assert config["engram_num_embeddings"] == [files.hasher.rows_per_layer[i] for i in (0, 2)]
    config["engram_num_embeddings"] = [1, 2]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MismatchError, match="engram_num_embeddings is \\[1, 2\\]"):
        open_model(tmp_path / "m")


def test_missing_and_truncated_files_name_the_file(tmp_path):
    make_tiny_model(tmp_path / "m")
    with pytest.raises(BadInputError, match="no such model directory"):
        open_model(tmp_path / "nothing")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="model.safetensors"):
        open_model(tmp_path / "m")
    weights.unlink()
    with pytest.raises(BadInputError, match="no model.safetensors"):
        open_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(BadInputError, match="tokenizer.json: file not found"):
        open_model(tmp_path / "m")


def test_a_wrong_shape_is_reported_with_the_tensor_name(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    tensors["norm.weight"] = torch.zeros(7)
    save_file(tensors, weights)
    with pytest.raises(MismatchError, match="norm.weight has shape \\[7\\]"):
        build_model(open_model(tmp_path / "m"), device="cpu")


def test_describe_counts_backbone_and_table_parameters(tmp_path):
    model, _ = make_tiny_model(tmp_path / "m")
    info = describe_model(open_model(tmp_path / "m"))
    tables = sum(model.state_dict()[table_name(i)].numel() for i in (0, 2))
    total = sum(p.numel() for p in model.parameters())
    assert info.table_parameters == tables
    assert info.backbone_parameters + info.table_parameters == total
    assert [t.rows for t in info.tables] == [model.hasher.rows_per_layer[i] for i in (0, 2)]
