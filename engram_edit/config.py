"""EngramConfig: the model's settings and the only way to and from ``config.json``.

Keys are flat, Hugging Face style; Engram keys use DeepSeek-V4.1's names where the idea is the
same (docs/engram.md section 7). Derived keys (compressed vocab size, rows per layer) are written
for checking and verified on load against the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from engram_edit.errors import BadInputError

HC_READOUTS = ("mean", "learned")


@dataclass
class EngramConfig:
    # backbone
    vocab_size: int = 8192  # raw tokenizer entries, added tokens included
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 688  # SwiGLU width; ~8/3 of hidden
    max_position_embeddings: int = 512  # longest sequence RoPE is set up for
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    moe_num_experts: int = 0  # 0 = dense SwiGLU MLP in every block
    moe_top_k: int = 2  # experts each token is routed to when moe_num_experts > 0
    # hyper-connections (docs/engram.md section 6)
    hc_mult: int = 4  # parallel residual streams; 1 = plain pre-norm residual
    hc_dynamic: bool = True  # add an input-dependent term to H_pre / H_post
    hc_sinkhorn_iters: int = 8  # Sinkhorn-Knopp iterations that keep H_res doubly stochastic
    hc_readout: str = "mean"  # how the final norm reads the streams: "mean" or "learned"
    # Engram (docs/engram.md sections 2-5)
    engram_layer_ids: list[int] = field(default_factory=lambda: [0, 2])
    engram_max_ngram_size: int = 3  # orders 2..N are hashed
    engram_n_heads: int = 4  # hash heads per n-gram order
    engram_head_dim: int = 32  # width of one table row
    engram_vocab_size: int | list[int] = 13000  # table size per order (int = same for all)
    engram_pad_token_id: int = 0  # raw tokenizer id used before the start of the text
    engram_seed: int = 0
    engram_kernel_size: int = 4  # ShortConv kernel
    # special tokens of the tokenizer, for generation and training
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # derived, written for checking (None until known)
    engram_compressed_vocab_size: int | None = None
    engram_num_embeddings: list[int] | None = None  # rows per Engram layer
    model_type: str = "engram"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise BadInputError(problems)

    # --- derived sizes --------------------------------------------------------------------
    @property
    def engram_orders(self) -> list[int]:
        return list(range(2, self.engram_max_ngram_size + 1))

    @property
    def engram_vocab_sizes(self) -> list[int]:
        """Table size per order 2..N, whatever form ``engram_vocab_size`` was given in."""
        v = self.engram_vocab_size
        return list(v) if isinstance(v, list) else [v] * (self.engram_max_ngram_size - 1)

    @property
    def engram_columns(self) -> int:
        """Hashed columns per layer: (orders) x (heads per order)."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    @property
    def engram_input_dim(self) -> int:
        """Width of the concatenated rows the Engram module reads at one position."""
        return self.engram_columns * self.engram_head_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # --- validation -----------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every invalid value, one line each (empty when the config is valid)."""
        p: list[str] = []
        if self.model_type != "engram":
            p.append(f"model_type: expected 'engram', got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "hc_mult",
                     "engram_n_heads", "engram_head_dim", "engram_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name}: must be a positive integer, got {value!r}")
        if p:
            return p
        if self.hidden_size % self.num_attention_heads:
            p.append(f"hidden_size: {self.hidden_size} is not divisible by "
                     f"num_attention_heads {self.num_attention_heads}")
        elif self.head_dim % 2:
            p.append(f"hidden_size / num_attention_heads = {self.head_dim} must be even for RoPE")
        if self.hc_sinkhorn_iters < 0:
            p.append(f"hc_sinkhorn_iters: must be >= 0, got {self.hc_sinkhorn_iters}")
        if self.hc_readout not in HC_READOUTS:
            p.append(f"hc_readout: must be one of {', '.join(HC_READOUTS)}, "
                     f"got {self.hc_readout!r}")
        if self.moe_num_experts < 0:
            p.append(f"moe_num_experts: must be >= 0, got {self.moe_num_experts}")
        elif self.moe_num_experts and not 1 <= self.moe_top_k <= self.moe_num_experts:
            p.append(f"moe_top_k: must be between 1 and moe_num_experts "
                     f"({self.moe_num_experts}), got {self.moe_top_k}")
        ids = self.engram_layer_ids
        if not isinstance(ids, list) or not ids:
            p.append(f"engram_layer_ids: must be a non-empty list, got {ids!r}")
        else:
            for i in ids:
                if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                    p.append(f"engram_layer_ids: layer id {i!r} is out of range "
                             f"0..{self.num_hidden_layers - 1}")
            if len(set(ids)) != len(ids):
                p.append(f"engram_layer_ids: repeated layer id in {ids}")
        if not isinstance(self.engram_max_ngram_size, int) or self.engram_max_ngram_size < 2:
            p.append(f"engram_max_ngram_size: must be an integer >= 2, "
                     f"got {self.engram_max_ngram_size!r}")
            return p
        v = self.engram_vocab_size
        if isinstance(v, list) and len(v) != self.engram_max_ngram_size - 1:
            p.append(f"engram_vocab_size: needs one entry per order 2..{self.engram_max_ngram_size}"
                     f" ({self.engram_max_ngram_size - 1}), got {len(v)}")
        elif any(not isinstance(s, int) or s < 2 for s in self.engram_vocab_sizes):
            p.append(f"engram_vocab_size: every size must be an integer >= 2, got {v!r}")
        if not 0 <= self.engram_pad_token_id < self.vocab_size:
            p.append(f"engram_pad_token_id: {self.engram_pad_token_id} is not a token id "
                     f"(vocab_size {self.vocab_size})")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                p.append(f"{name}: {value} is not a token id (vocab_size {self.vocab_size})")
        n = self.engram_num_embeddings
        if n is not None and (not isinstance(n, list) or len(n) != len(ids)):
            p.append(f"engram_num_embeddings: needs one row count per Engram layer "
                     f"({len(ids)}), got {n!r}")
        return p

    # --- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> EngramConfig:
        """Build from a dict; unknown keys and wrong types fail with the key named."""
        if not isinstance(data, dict):
            raise BadInputError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        problems = [f"{source}: {k}: unknown key" for k in unknown]
        if problems:
            raise BadInputError(problems)
        try:
            return cls(**data)
        except BadInputError as err:
            raise BadInputError([f"{source}: {line}" for line in err.problems]) from None
        except TypeError as err:  # e.g. a comparison of str with int inside validation
            raise BadInputError(f"{source}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> EngramConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadInputError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise BadInputError(f"{path}: cannot read ({err})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        return cls.from_dict(data, source=str(path))
