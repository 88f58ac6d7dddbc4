import json

import pytest

from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError


def test_config_round_trips_through_json(tmp_path):
    config = EngramConfig(engram_vocab_size=[101, 211], engram_num_embeddings=[1, 2])
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert EngramConfig.from_json_file(path) == config


def test_each_bad_value_gets_its_own_line():
    with pytest.raises(BadInputError) as err:
        EngramConfig(hidden_size=250, engram_layer_ids=[0, 7], engram_vocab_size=[5])
    lines = err.value.problems
    assert any("hidden_size: 250 is not divisible" in x for x in lines)
    assert any("layer id 7 is out of range 0..3" in x for x in lines)
    assert any("engram_vocab_size: needs one entry per order" in x for x in lines)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "hiden_size": 3}))
    with pytest.raises(BadInputError, match=r"config.json: hiden_size: unknown key"):
        EngramConfig.from_json_file(path)


def test_bad_json_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(BadInputError, match="config.json: file not found"):
        EngramConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(BadInputError, match="config.json: not valid JSON"):
        EngramConfig.from_json_file(tmp_path / "config.json")
