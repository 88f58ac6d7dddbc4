"""The DeepSeek-V4.1 layout: config keys, Engram tensor names, hashing profile, ``wkv`` layout;
and reading such a directory in place, opening only the shards that hold what is needed.

Verified against vLLM's DeepSeek-V4.1 code (vllm-project/vllm: vllm/models/deepseek_v4_1/
common/engram.py, nvidia/model.py, common/mm_preprocess.py; vllm/transformers_utils/configs/
deepseek_v41.py); what they do not settle is marked "assumed". docs/engram.md section 7.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.hashing import NgramHasher
from engram_edit.layouts.base import (
    CONFIG_FILE,
    ConfigMapping,
    HashingProfile,
    Keep,
    Rename,
    locate_some,
    read_config,
)
from engram_edit.tensorfile import TensorLocation
from engram_edit.tokenizer import EngramTokenizer

logger = logging.getLogger(__name__)

NAME = "v4"
TITLE = "DeepSeek-V4.1 (sharded safetensors, FP8 Engram tables)"
MODEL_TYPE = "deepseek_v41"  # top-level model_type; the text model sits under text_config
TEXT = "text_config"
LAYER_PREFIX = "layers.{i}.engram."
PASSTHROUGH = False  # every other tensor stays in the source checkpoint (referenced, not copied)
FP8_BLOCK = 32  # rows and wkv carry one E8M0 scale per 32 values (per 32 x 32 block for wkv)
TABLE_DTYPE, SCALE_DTYPE = "F8_E4M3", "F8_E8M0"
FLOAT_DTYPES = ("BF16", "F32", "F16")

PROFILE = HashingProfile(
    name="deepseek-v4.1",
    seed=0,  # multipliers from default_rng(10007 * layer_id): the spec's rule with seed 0
    # the image token and its alignment pad (ids 129264, 129265 in V4.1's tokenizer): every
    # image-span position carries one of them and is "dead" for Engram
    blocked_tokens=("<｜deepseek_image｜>", "<|place_holder_mm_span_0436|>"),
    verified="vllm-project/vllm vllm/models/deepseek_v4_1/common/engram.py "
             "(build_compressed_token_map, compute_hash_multipliers, EngramLayout, "
             "_hash_ids_kernel) and common/mm_preprocess.py (image_sentinel_mask)")

# The released V4.1-Flash geometry (docs/engram.md section 7); rows are checked, not trusted.
RELEASE: dict[str, Any] = {
    "engram_layer_ids": [1, 14],
    "engram_max_ngram_size": 4,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_vocab_size": 16_000_000,
    "engram_num_embeddings": [384_006_168, 384_016_682],
    "engram_compressed_vocab_size": 99_092,
    "engram_pad_token_id": 2,
    "hidden_size": 5120,
    "hc_mult": 4,
    "vocab_size": 129_280,
}

# text_config keys that mean exactly what the engram-edit field of the same name means
TEXT_KEYS = (
    "engram_layer_ids", "engram_num_embeddings", "engram_max_ngram_size", "engram_vocab_size",
    "engram_n_heads", "engram_head_dim", "engram_pad_token_id", "engram_compressed_vocab_size",
    "vocab_size", "hidden_size", "num_hidden_layers", "hc_mult", "rms_norm_eps",
    "tie_word_embeddings",
)
TOP_KEYS = ("bos_token_id", "eos_token_id")
INFO_KEYS = ("num_attention_heads",)  # text_config figures info shows that have no field of ours
REQUIRED = ("engram_layer_ids", "engram_max_ngram_size", "engram_vocab_size", "engram_n_heads",
            "engram_head_dim", "engram_pad_token_id", "vocab_size", "hidden_size", "hc_mult",
            "num_hidden_layers")

# Per Engram layer, relative to LAYER_PREFIX. wkv, q_weight and k_weight have no engram-edit
# equivalent (see wkv_rows) and ride along under their own names.
ENGRAM_RULES = (
    Rename("embed.weight", "embed.weight"),
    Rename("embed.scale", "embed.scale"),
    Keep("wkv.weight"),
    Keep("wkv.scale"),
    Keep("q_weight"),
    Keep("k_weight"),
)
# Whole-model tensors the logit lens and a closed-form overwrite read (nvidia/model.py mapper:
# embed.weight -> embed_tokens, head.weight -> lm_head, norm.weight the final RMSNorm).
GLOBAL_RULES = (
    Rename("embed.weight", "embed_tokens.weight"),
    Rename("norm.weight", "norm.weight"),
    Rename("head.weight", "lm_head.weight"),
)


def claims(config: dict[str, Any]) -> bool:
    """A config with model_type deepseek_v41 and Engram keys in text_config is a V4.1 config."""
    text = config.get(TEXT)
    return config.get("model_type") == MODEL_TYPE and isinstance(text, dict) and \
        "engram_layer_ids" in text


def layer_ids(config: dict[str, Any]) -> list[int]:
    return list(config[TEXT]["engram_layer_ids"])


def markers(layer_id: int) -> tuple[str, ...]:
    """Tensor names of one Engram layer that confirm the layout: the table, or ``wkv`` in a
    backbone whose tables were split off."""
    prefix = LAYER_PREFIX.format(i=layer_id)
    return (prefix + "embed.weight", prefix + "wkv.weight")


def config_to_ours(data: dict[str, Any], source: str) -> ConfigMapping:
    """Read a V4.1 config.json into EngramConfig fields (``TEXT_KEYS``, ``TOP_KEYS``, the
    profile's seed); every other key is unmapped and kept verbatim.

    Raises:
        BadInputError: no text_config, or a required key missing (all named at once).
    """
    text = data.get(TEXT)
    if not isinstance(text, dict):
        raise BadInputError(f"{source}: no {TEXT} object (DeepSeek-V4.1 keeps its text model "
                            f"there)")
    missing = [f"{source}: {TEXT}.{k}: missing (needed to hash and address the tables)"
               for k in REQUIRED if k not in text]
    if missing:
        raise BadInputError(missing)
    ours = {k: text[k] for k in TEXT_KEYS if k in text}
    ours.update({k: data[k] for k in TOP_KEYS if k in data})
    ours["engram_seed"] = PROFILE.seed
    unmapped = {k: v for k, v in data.items() if k not in (TEXT, *TOP_KEYS)}
    unmapped.update({f"{TEXT}.{k}": v for k, v in text.items() if k not in TEXT_KEYS})
    fields = {f.name for f in dataclasses.fields(EngramConfig)}
    filled = sorted(fields - set(ours) - {"model_type"})
    return ConfigMapping(ours, unmapped, filled)


def config_from_ours(config: EngramConfig, original: dict[str, Any]) -> dict[str, Any]:
    """``original`` (the source config.json) with the mapped keys set from ``config``."""
    ours = config.to_dict()
    out = dict(original)
    text = dict(out[TEXT])
    text.update({k: ours[k] for k in TEXT_KEYS if k in text})
    out[TEXT] = text
    out.update({k: ours[k] for k in TOP_KEYS if k in out})
    return out


# --- the wkv layout ------------------------------------------------------------------------

def wkv_rows(config: EngramConfig) -> dict[str, tuple[int, int]]:
    """Output rows of ``wkv.weight`` per part: ``key{b}`` for branch b, then ``value``.

    Keys first, value last: ``kv.split([hc_mult * hidden, hidden])`` (vLLM Engram.forward and
    _fused_engram_post_wkv_kernel). The input axis is the gathered rows in column order, as in
    the spec. No bias, no ShortConv; the gate uses ``q_weight * k_weight`` and rms_norm_eps.
    """
    d, n = config.hidden_size, config.hc_mult
    parts = {f"key{b}": (b * d, (b + 1) * d) for b in range(n)}
    parts["value"] = (n * d, (n + 1) * d)
    return parts


def blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


# --- hashing with blocked tokens ------------------------------------------------------------

def blocked_ids(tokenizer: EngramTokenizer) -> list[int]:
    """Raw ids of the profile's blocked tokens in ``tokenizer`` (those it has)."""
    found = (tokenizer.token_id(t) for t in PROFILE.blocked_tokens)
    return sorted(i for i in found if i is not None)


def hash_rows(hasher: NgramHasher, compressed_ids: np.ndarray,
              dead: np.ndarray) -> dict[int, np.ndarray]:
    """Global rows ``[T, columns]`` per layer, lookback stopped at dead positions.

    The n-gram ending at t uses ``ids[t - k]`` while no position t, t-1, ..., t-k is dead and
    t - k >= 0, and the pad id from there back (vLLM ``_hash_ids_kernel``: ``blocked`` sticks
    once set). Without dead positions this is ``hasher.rows``.
    """
    ids = np.asarray(compressed_ids, dtype=np.int64)
    dead = np.asarray(dead, dtype=bool)
    t = len(ids)
    out = {}
    for lid in hasher.layer_ids:
        m, primes, offsets = hasher.multipliers[lid], hasher.primes[lid], hasher.offsets[lid]
        blocked = np.zeros(t, dtype=bool)
        mix = np.zeros(t, dtype=np.int64)
        cols = []
        for k in range(hasher.max_ngram):
            pos = np.arange(t) - k
            inside = pos >= 0
            blocked |= ~inside | np.where(inside, dead[np.maximum(pos, 0)], False)
            value = np.where(blocked, hasher.pad_id, ids[np.maximum(pos, 0)])
            mix = mix ^ (value * m[k])
            if k:
                start = (k - 1) * hasher.n_heads
                cols.append(mix[:, None] % primes[start:start + hasher.n_heads])
        out[lid] = np.concatenate(cols, axis=1) + offsets
    return out


class BlockingHasher(NgramHasher):
    """The spec's hasher with V4.1's lookback rule: a position holding a blocked token is dead,
    and no n-gram reaches over it (``hash_rows``). Dead positions are known by their compressed
    ids, which is exact while no other token compresses to a blocked token's id (logged when
    one does). numpy and torch inputs; without blocked tokens it is ``NgramHasher`` itself."""

    def __init__(self, config: EngramConfig, compressed_vocab_size: int, pad_id: int,
                 dead_ids: list[int]):
        super().__init__(config, compressed_vocab_size, pad_id)
        self.dead_ids = np.array(sorted(set(dead_ids)), dtype=np.int64)

    @classmethod
    def for_tokenizer(cls, config: EngramConfig, tokenizer: EngramTokenizer) -> BlockingHasher:
        table = tokenizer.compression
        blocked = blocked_ids(tokenizer)
        dead = table[blocked].tolist()
        shared = int(np.isin(table, dead).sum()) - len(blocked)
        if shared:
            logger.warning("%d token(s) share a compressed id with a blocked token; they are "
                           "treated as blocked too", shared)
        return cls(config, tokenizer.compressed_vocab_size,
                   int(table[config.engram_pad_token_id]), dead)

    def slots(self, compressed_ids: Any) -> dict[int, Any]:
        if not len(self.dead_ids):
            return super().slots(compressed_ids)
        is_torch = not isinstance(compressed_ids, np.ndarray)
        ids = compressed_ids.detach().cpu().numpy() if is_torch else compressed_ids
        flat = np.asarray(ids, dtype=np.int64).reshape(-1, ids.shape[-1])
        out = {lid: np.empty((*flat.shape, self.columns), np.int64) for lid in self.layer_ids}
        for k, row in enumerate(flat):
            rows = hash_rows(self, row, np.isin(row, self.dead_ids))
            for lid in self.layer_ids:
                out[lid][k] = rows[lid] - self.offsets[lid]
        shaped = {lid: a.reshape(*ids.shape, self.columns) for lid, a in out.items()}
        if not is_torch:
            return shaped
        import torch

        return {lid: torch.from_numpy(a).to(compressed_ids.device) for lid, a in shaped.items()}


# --- reading a V4.1 directory in place -----------------------------------------------------

def wanted_tensors(config: EngramConfig) -> dict[str, str]:
    """engram-edit name -> V4.1 name of every tensor a V4.1 directory is read for."""
    out = {}
    for i in config.engram_layer_ids:
        prefix = LAYER_PREFIX.format(i=i)
        for rule in ENGRAM_RULES:
            ours = rule.ours if isinstance(rule, Rename) else rule.source
            out[prefix + ours] = prefix + rule.source
    out.update({r.ours: r.source for r in GLOBAL_RULES})
    return out


def _expect(loc: TensorLocation | None, dtypes: tuple[str, ...], shape: tuple[int, ...],
            source: Path) -> list[str]:
    if loc is None:
        return []
    if loc.dtype not in dtypes:
        return [f"{source}: dtype not supported: {loc.name} is {loc.dtype}; the v4 layout "
                f"reads it as {' or '.join(dtypes)}"]
    if tuple(loc.shape) != shape:
        return [f"{source}: {loc.name} has shape {list(loc.shape)}, expected {list(shape)} "
                f"from config.json"]
    return []


def tensor_problems(config: EngramConfig, tensors: dict[str, TensorLocation],
                    source: Path) -> list[str]:
    """dtype and shape problems of the V4.1 tensors present (tables are checked elsewhere)."""
    d, n, v = config.hidden_size, config.hc_mult, config.vocab_size
    p: list[str] = []
    tables = [tensors.get(LAYER_PREFIX.format(i=i) + "embed.weight")
              for i in config.engram_layer_ids]
    bad = [t for t in tables if t is not None and t.dtype != TABLE_DTYPE]
    if bad:
        p.append(f"{source}: dtype not supported: "
                 f"{', '.join(f'{t.name} is {t.dtype}' for t in bad)}; DeepSeek-V4.1 tables are "
                 f"{TABLE_DTYPE} rows with {SCALE_DTYPE} scales")
    for i in config.engram_layer_ids:
        prefix = LAYER_PREFIX.format(i=i)
        wkv = tensors.get(prefix + "wkv.weight")
        out, cols = (n + 1) * d, config.engram_input_dim
        p += _expect(wkv, (TABLE_DTYPE, *FLOAT_DTYPES), (out, cols), source)
        if wkv is not None and wkv.dtype == TABLE_DTYPE:
            scale = tensors.get(prefix + "wkv.scale")
            if scale is None:
                p.append(f"{source}: {wkv.name} is FP8 but {prefix}wkv.scale is missing")
            p += _expect(scale, (SCALE_DTYPE,), (blocks(out), blocks(cols)), source)
        for name in ("q_weight", "k_weight"):
            p += _expect(tensors.get(prefix + name), FLOAT_DTYPES, (n, d), source)
    p += _expect(tensors.get("embed_tokens.weight"), FLOAT_DTYPES, (v, d), source)
    p += _expect(tensors.get("lm_head.weight"), FLOAT_DTYPES, (v, d), source)
    p += _expect(tensors.get("norm.weight"), FLOAT_DTYPES, (d,), source)
    return p


def open_config(path: Path) -> tuple[EngramConfig, ConfigMapping]:
    mapping = config_to_ours(read_config(path), str(path / CONFIG_FILE))
    return EngramConfig.from_dict(mapping.ours, source=str(path / CONFIG_FILE)), mapping


def described_config(path: Path) -> dict[str, Any]:
    """The figures of a V4.1 config.json, under engram-edit's names: every EngramConfig field
    the file sets (fields it leaves at our defaults are left out) and the ``INFO_KEYS`` of
    text_config."""
    config, mapping = open_config(path)
    real = {k: v for k, v in config.to_dict().items()
            if k not in mapping.filled and k != "model_type"}
    real.update({k: mapping.unmapped[f"{TEXT}.{k}"] for k in INFO_KEYS
                 if f"{TEXT}.{k}" in mapping.unmapped})
    return real


def open_model(path: str | Path, memory: str | Path | None = None):
    """Read a DeepSeek-V4.1 directory in place as a ``ModelFiles`` (``layout`` "v4").

    Only config.json, tokenizer.json, the index and the headers of the shards that hold the
    Engram tensors and the token embedding, final norm and LM head are read; the MoE experts'
    shards are never opened. Tensors carry engram-edit names where one exists (tables under
    their own name, ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``) and their V4.1
    names otherwise (``layers.{i}.engram.wkv.weight``, ...).

    Args:
        path (`str` or `Path`): the V4.1 checkpoint directory.
        memory (`str` or `Path`, optional): a split memory to read the tables from instead.

    Returns:
        `ModelFiles`

    Raises:
        BadInputError: a missing key, shard or table; a dtype the layout does not read.
        MismatchError: derived keys or a plugged memory that do not fit the config.

    Example:
        >>> files = open_model("DeepSeek-V4.1-Flash")  # doctest: +SKIP
        >>> files.table().read_rows(1, np.array([7]))  # doctest: +SKIP
    """
    from engram_edit import checkpoint as ck

    path = Path(path)
    config, _ = open_config(path)
    tokenizer = EngramTokenizer.from_file(path / ck.TOKENIZER_FILE)
    hasher = BlockingHasher.for_tokenizer(config, tokenizer)
    problems = ck.derived_problems(config, tokenizer, hasher, str(path / CONFIG_FILE))
    if problems:
        raise MismatchError(problems)
    wanted = wanted_tensors(config)
    tables = set(ck.table_names(config).values()) | {ck.scale_name(i)
                                                      for i in config.engram_layer_ids}
    names = [src for ours, src in wanted.items() if memory is None or ours not in tables]
    found = locate_some(path, names)
    tensors = {ours: found[src] for ours, src in wanted.items() if src in found}
    problems = tensor_problems(config, tensors, path)
    if problems:
        raise BadInputError(problems)
    mem = None
    if memory is not None:
        mem = ck.open_memory(memory)
        mismatch = ck.memory_mismatch(config, tokenizer, mem)
        if mismatch:
            raise MismatchError(mismatch)
        tensors.update({k: v for k, v in mem.tensors.items()
                        if ck.is_memory_tensor(k, config.engram_layer_ids)})
    ck.check_tables(config, hasher, tensors, mem.path / ck.MEMORY_FILE if mem else path)
    return ck.ModelFiles(path, config, tokenizer, hasher, tensors, mem, layout=NAME)
