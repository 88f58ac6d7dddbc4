"""The deepseek-ai/Engram demo layout: its Engram module's tensor names and its config dataclasses.

Declared tables only; interop.py applies them. Verified against ``engram_demo_v1.py`` of
deepseek-ai/Engram (module and dataclass fields); docs/engram.md sections 2-5 and 7.

The demo ships no checkpoint format and mocks its backbone, so this layout is the demo's
``Engram`` state_dict under each Engram layer's ``layers.{i}.engram.`` prefix, with every other
tensor (the backbone) kept in engram-edit's own names, and config.json holding the demo's two
dataclasses flat (``EngramConfig`` and ``BackBoneConfig``) plus any engram-edit backbone keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError
from engram_edit.layouts.base import ConfigMapping, Derived, HashingProfile, Rename, Stack

NAME = "demo"
TITLE = "deepseek-ai/Engram demo (engram_demo_v1.py)"
LAYER_PREFIX = "layers.{i}.engram."
PASSTHROUGH = True  # non-Engram tensors keep their (engram-edit) names
TABLE_DTYPES = ("F32", "BF16", "F16")  # nn.Embedding rows; the demo has no FP8 scales

PROFILE = HashingProfile(
    name="engram-demo", seed=None,
    verified="deepseek-ai/Engram engram_demo_v1.py (NgramHashMapping, CompressedTokenizer); "
             "tests/data/golden/hashing.json")

# demo dataclass field -> engram-edit field, same meaning and value
KEYS: dict[str, str] = {
    "layer_ids": "engram_layer_ids",
    "max_ngram_size": "engram_max_ngram_size",
    "n_head_per_ngram": "engram_n_heads",
    "engram_vocab_size": "engram_vocab_size",
    "pad_id": "engram_pad_token_id",  # a raw id; the demo compresses it, as the spec does
    "seed": "engram_seed",
    "kernel_size": "engram_kernel_size",
    "hidden_size": "hidden_size",
    "hc_mult": "hc_mult",
    "vocab_size": "vocab_size",
    "num_layers": "num_hidden_layers",
}
# n_embed_per_ngram is the width of one order's heads together: engram_head_dim * heads
WIDTH_KEY = "n_embed_per_ngram"

# The demo dataclasses' own defaults, which a demo config that leaves a field out means.
DEFAULTS: dict[str, Any] = {
    "tokenizer_name_or_path": "deepseek-ai/DeepSeek-V3",
    "engram_vocab_size": [129280 * 5, 129280 * 5],
    "max_ngram_size": 3,
    "n_embed_per_ngram": 512,
    "n_head_per_ngram": 8,
    "layer_ids": [1, 15],
    "pad_id": 2,
    "seed": 0,
    "kernel_size": 4,
    "hidden_size": 1024,
    "hc_mult": 4,
    "vocab_size": 129280,
    "num_layers": 30,
}

# The demo Engram module's state_dict, relative to LAYER_PREFIX. norm1 normalises the key and
# norm2 the query (Engram.forward); ShortConv keeps one RMSNorm per branch.
ENGRAM_RULES = (
    Rename("multi_head_embedding.embedding.weight", "embed.weight"),
    Derived("multi_head_embedding.offsets", "I64"),  # a persistent buffer: column offsets
    Rename("value_proj.weight", "value_proj.weight"),
    Rename("value_proj.bias", "value_proj.bias"),
    Stack("key_projs.{b}.weight", "key_proj.weight"),
    Stack("key_projs.{b}.bias", "key_proj.bias"),
    Stack("norm1.{b}.weight", "key_norm.weight", new_axis=True),
    Stack("norm2.{b}.weight", "query_norm.weight", new_axis=True),
    Stack("short_conv.norms.{b}.weight", "conv_norm.weight", new_axis=True),
    Rename("short_conv.conv.weight", "conv.weight"),
)
GLOBAL_RULES: tuple = ()

_DERIVED_FIELDS = ("engram_compressed_vocab_size", "engram_num_embeddings", "model_type")


def claims(config: dict[str, Any]) -> bool:
    """A config that declares the demo's row-width fields is a demo config."""
    return WIDTH_KEY in config and "n_head_per_ngram" in config


def markers(layer_id: int) -> tuple[str, ...]:
    """Tensor names of one Engram layer that confirm the layout (any one is enough)."""
    return (LAYER_PREFIX.format(i=layer_id) + ENGRAM_RULES[0].source,)


def layer_ids(config: dict[str, Any]) -> list[int]:
    return list(config.get("layer_ids", DEFAULTS["layer_ids"]))


def config_to_ours(data: dict[str, Any], source: str) -> ConfigMapping:
    """Read a demo config.json into EngramConfig fields.

    Demo fields map through ``KEYS`` (and ``n_embed_per_ngram / n_head_per_ngram`` becomes
    ``engram_head_dim``); fields the demo config leaves out take the demo's defaults; engram-edit
    fields pass through; anything else is unmapped and kept verbatim.

    Raises:
        BadInputError: a demo field and an engram-edit field that disagree, or a row width that
            does not split over the heads; every problem at once.
    """
    ours_fields = {f.name for f in dataclasses.fields(EngramConfig)}
    demo = {**{k: v for k, v in DEFAULTS.items() if k != "tokenizer_name_or_path"},
            **{k: v for k, v in data.items() if k in KEYS or k == WIDTH_KEY}}
    filled = [f"{k} (demo default)" for k in sorted(DEFAULTS)
              if k not in data and k != "tokenizer_name_or_path"]
    ours: dict[str, Any] = {}
    unmapped: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        if key in KEYS or key == WIDTH_KEY:
            continue
        if key in ours_fields:
            ours[key] = value
        else:
            unmapped[key] = value
    mapped = {KEYS[k]: v for k, v in demo.items() if k in KEYS}
    width, heads = demo[WIDTH_KEY], demo["n_head_per_ngram"]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (width, heads)):
        problems.append(f"{source}: {WIDTH_KEY} and n_head_per_ngram must be positive integers, "
                        f"got {width!r} and {heads!r}")
    elif width % heads:
        problems.append(f"{source}: {WIDTH_KEY} {width} is not divisible by n_head_per_ngram "
                        f"{heads} (a row is {WIDTH_KEY} / n_head_per_ngram wide)")
    else:
        mapped["engram_head_dim"] = width // heads
    for key, value in mapped.items():
        if key in ours and ours[key] != value:
            problems.append(f"{source}: {key} is {ours[key]!r} but the demo field for it says "
                            f"{value!r}")
        ours[key] = value
    if problems:
        raise BadInputError(problems)
    filled += sorted(f for f in ours_fields - set(ours) - set(_DERIVED_FIELDS))
    return ConfigMapping(ours, unmapped, filled)


def config_from_ours(config: EngramConfig, unmapped: dict[str, Any]) -> dict[str, Any]:
    """The demo config.json of an engram-edit config: demo fields first, then the engram-edit
    backbone fields the demo has no name for, then the kept unmapped keys."""
    ours = config.to_dict()
    out: dict[str, Any] = {}
    for demo_key, our_key in KEYS.items():
        out[demo_key] = ours[our_key]
    out[WIDTH_KEY] = config.engram_head_dim * config.engram_n_heads
    for key, value in ours.items():
        if key not in KEYS.values() and key not in ("engram_head_dim",) + _DERIVED_FIELDS:
            out[key] = value
    out.update(unmapped)
    return out
