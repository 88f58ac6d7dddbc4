"""Fixture generator: tiny checkpoints in the demo and DeepSeek-V4.1 layouts.

Sizes are tiny; key names, dtypes and sharding are those of the real layouts (the demo's
``Engram`` module from deepseek-ai/Engram engram_demo_v1.py; V4.1's nested config, FP8 tables
with E8M0 scales, FP8 ``wkv`` with 32 x 32 block scales, bf16 norms, packed experts in their own
shards, one shard per Engram layer). Written with safetensors' own writer, not ours.

    python tests/make_layouts.py OUT_DIR      # writes OUT_DIR/demo and OUT_DIR/v4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
TOKENIZER = HERE / "data" / "golden" / "tiny_tokenizer.json"
VOCAB = 500  # entries of the tiny tokenizer

DEMO_CONFIG = {  # the demo's two dataclasses, tiny; plus the engram-edit backbone keys
    "tokenizer_name_or_path": "tiny_tokenizer.json",
    "engram_vocab_size": [31, 37],
    "max_ngram_size": 3,
    "n_embed_per_ngram": 16,
    "n_head_per_ngram": 2,
    "layer_ids": [0, 2],
    "pad_id": 2,
    "seed": 0,
    "kernel_size": 4,
    "hidden_size": 32,
    "hc_mult": 2,
    "vocab_size": VOCAB,
    "num_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

V4_TEXT = {  # a tiny text_config with the released V4.1 key names
    "model_type": "deepseek_v41_text",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "q_lora_rank": 32,
    "compress_ratios": [0, 2, 2, 0],
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "engram_layer_ids": [1, 3],
    "engram_max_ngram_size": 4,
    "engram_vocab_size": 50,
    "engram_n_heads": 2,
    "engram_head_dim": 32,
    "engram_pad_token_id": 2,
    "tie_word_embeddings": False,
}


def _random_fp8(rng: np.random.Generator, shape: tuple[int, ...]):
    import torch

    codes = rng.integers(0, 0x7E, size=shape, dtype=np.uint8)  # no NaN codes
    codes |= rng.integers(0, 2, size=shape, dtype=np.uint8) << 7
    return torch.from_numpy(codes).view(torch.float8_e4m3fn)


def _random_scale(rng: np.random.Generator, shape: tuple[int, ...]):
    import torch

    return torch.from_numpy(rng.integers(112, 127, size=shape, dtype=np.uint8)).view(
        torch.float8_e8m0fnu)


def _write_shards(path: Path, shards: list[dict], metadata: dict[str, str] | None = None) -> None:
    """Each dict becomes one shard; more than one also gets the index."""
    from safetensors.torch import save_file

    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=metadata)
        return
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / name), metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _rows(config: dict) -> list[int]:
    """Rows per Engram layer by the spec's prime rule (engram_edit.hashing)."""
    from engram_edit.config import EngramConfig
    from engram_edit.hashing import model_primes

    primes = model_primes(EngramConfig(**config))
    return [int(primes[i].sum()) for i in config["engram_layer_ids"]]


def make_demo_dir(path: str | Path, seed: int = 0, sharded: bool = False,
                  with_offsets: bool = True) -> Path:
    """A demo-layout checkpoint: the demo Engram module per layer, an engram-edit backbone."""
    import torch

    from engram_edit.checkpoint import model_compression
    from engram_edit.config import EngramConfig
    from engram_edit.model import EngramModel
    from engram_edit.tokenizer import EngramTokenizer

    path = Path(path)
    path.mkdir(parents=True)
    c = DEMO_CONFIG
    width, heads, hidden, hc = (c["n_embed_per_ngram"], c["n_head_per_ngram"], c["hidden_size"],
                                c["hc_mult"])
    ours = EngramConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=c["num_layers"],
                        num_attention_heads=c["num_attention_heads"],
                        intermediate_size=c["intermediate_size"],
                        max_position_embeddings=c["max_position_embeddings"], hc_mult=hc,
                        engram_layer_ids=c["layer_ids"], engram_max_ngram_size=3,
                        engram_n_heads=heads, engram_head_dim=width // heads,
                        engram_vocab_size=c["engram_vocab_size"], engram_pad_token_id=2)
    torch.manual_seed(seed)
    model = EngramModel(ours, model_compression(ours, EngramTokenizer.from_file(TOKENIZER)))
    backbone = {k: v.detach().clone() + 0.01 * torch.randn_like(v)
                for k, v in model.state_dict().items() if ".engram." not in k}
    engram: dict[str, torch.Tensor] = {}
    e = (c["max_ngram_size"] - 1) * width
    for i in c["layer_ids"]:
        p = f"layers.{i}.engram."
        rows = model.hasher.rows_per_layer[i]
        engram[p + "multi_head_embedding.embedding.weight"] = torch.randn(rows, width // heads)
        if with_offsets:
            engram[p + "multi_head_embedding.offsets"] = torch.from_numpy(model.hasher.offsets[i])
        engram[p + "value_proj.weight"] = torch.randn(hidden, e) * 0.1
        engram[p + "value_proj.bias"] = torch.randn(hidden) * 0.1
        for b in range(hc):
            engram[p + f"key_projs.{b}.weight"] = torch.randn(hidden, e) * 0.1
            engram[p + f"key_projs.{b}.bias"] = torch.randn(hidden) * 0.1
            engram[p + f"norm1.{b}.weight"] = 1 + 0.1 * torch.randn(hidden)
            engram[p + f"norm2.{b}.weight"] = 1 + 0.1 * torch.randn(hidden)
            engram[p + f"short_conv.norms.{b}.weight"] = 1 + 0.1 * torch.randn(hidden)
        engram[p + "short_conv.conv.weight"] = torch.randn(hc * hidden, 1, c["kernel_size"]) * .1
    tensors = {**backbone, **engram}
    if sharded:
        names = sorted(tensors)
        half = len(names) // 2
        _write_shards(path, [{k: tensors[k] for k in names[:half]},
                             {k: tensors[k] for k in names[half:]}])
    else:
        _write_shards(path, [tensors])
    (path / "config.json").write_text(json.dumps(c, indent=4) + "\n")
    shutil.copyfile(TOKENIZER, path / "tokenizer.json")
    return path


def v4_config() -> dict:
    """The tiny V4.1 config.json, derived keys filled in."""
    from engram_edit.tokenizer import EngramTokenizer

    text = dict(V4_TEXT)
    tokenizer = EngramTokenizer.from_file(TOKENIZER)
    text["engram_compressed_vocab_size"] = tokenizer.compressed_vocab_size
    ours = {k: text[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "hc_mult",
                                 "engram_layer_ids", "engram_max_ngram_size", "engram_vocab_size",
                                 "engram_n_heads", "engram_head_dim", "engram_pad_token_id")}
    text["engram_num_embeddings"] = _rows({**ours, "num_attention_heads": 4})
    return {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "image_token_id": 129264,
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                "weight_block_size": [32, 32], "scale_fmt": "ue8m0",
                                "expert_dtype": "fp4"},
        "text_config": text,
        "vision_config": {"model_type": "deepseek_v41_vision", "num_hidden_layers": 2},
    }


def make_v4_dir(path: str | Path, seed: int = 0) -> Path:
    """A DeepSeek-V4.1-layout checkpoint in five shards: embedding and layer 0, every MoE
    expert, the other layers with the final norm and head, then one shard per Engram layer."""
    import torch

    path = Path(path)
    path.mkdir(parents=True)
    config = v4_config()
    t = config["text_config"]
    d, n, v = t["hidden_size"], t["hc_mult"], t["vocab_size"]
    cols = (t["engram_max_ngram_size"] - 1) * t["engram_n_heads"]
    rng = np.random.default_rng(seed)

    def bf16(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).bfloat16()

    def layer(i: int) -> dict:
        p = f"layers.{i}."
        return {p + "attn_norm.weight": bf16(d), p + "ffn_norm.weight": bf16(d),
                p + "attn.wq_a.weight": _random_fp8(rng, (t["q_lora_rank"], d)),
                p + "attn.wq_a.scale": _random_scale(rng, (1, d // 32)),
                p + "ffn.gate.weight": bf16(t["n_routed_experts"], d),
                p + "hc_attn_fn": torch.from_numpy(
                    rng.standard_normal(((2 + n) * n, n * d)).astype(np.float32)),
                p + "hc_attn_base": torch.zeros((2 + n) * n), p + "hc_attn_scale": torch.ones(3)}

    def experts(i: int) -> dict:
        out = {}
        for e in range(t["n_routed_experts"]):
            for w, shape in (("w1", (32, d // 2)), ("w2", (d, 16)), ("w3", (32, d // 2))):
                p = f"layers.{i}.ffn.experts.{e}.{w}."
                out[p + "weight"] = torch.from_numpy(
                    rng.integers(-128, 127, size=shape, dtype=np.int8))  # packed E2M1 pairs
                out[p + "scale"] = _random_scale(rng, (shape[0], shape[1] * 2 // 32))
        return out

    def engram(i: int, rows: int) -> dict:
        p = f"layers.{i}.engram."
        w = t["engram_head_dim"]
        return {p + "embed.weight": _random_fp8(rng, (rows, w)),
                p + "embed.scale": _random_scale(rng, (rows, w // 32)),
                p + "wkv.weight": _random_fp8(rng, ((n + 1) * d, cols * w)),
                p + "wkv.scale": _random_scale(rng, ((n + 1) * d // 32, cols * w // 32)),
                p + "q_weight": bf16(n, d), p + "k_weight": bf16(n, d)}

    last = t["num_hidden_layers"]
    shards = [
        {"embed.weight": bf16(v, d), **layer(0)},
        {k: val for i in range(last) for k, val in experts(i).items()},
        {**{k: val for i in range(1, last) for k, val in layer(i).items()},
         "norm.weight": bf16(d), "head.weight": bf16(v, d)},
        *[engram(i, rows) for i, rows in zip(t["engram_layer_ids"], t["engram_num_embeddings"],
                                              strict=True)],
    ]
    _write_shards(path, shards, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(TOKENIZER, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 1048576}\n')
    (path / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": 1}\n')
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to create demo/ and v4/ in")
    args = parser.parse_args()
    make_demo_dir(args.out / "demo")
    make_v4_dir(args.out / "v4")


if __name__ == "__main__":
    main()
