"""EngramModel: token embedding, blocks (Engram, attention, MLP or MoE, each sublayer under a
hyper-connection), final norm and LM head. Hashing is ``engram_edit.hashing``; weights on disk
are ``engram_edit.checkpoint``'s business; where the tables live is placement.py's.
docs/engram.md sections 4-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.hashing import NgramHasher
from engram_edit.model.blocks import Attention, MoE, SwiGLU, rope_tables
from engram_edit.model.engram import EngramModule
from engram_edit.model.hyper import HyperConnection, LearnedReadout
from engram_edit.model.norms import BranchRMSNorm, RMSNorm
from engram_edit.model.placement import DeviceRows, RowSource


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab_size]
    gates: dict[int, torch.Tensor] | None = None  # layer id -> alpha [B, T, hc_mult]


class Block(nn.Module):
    """``X <- X + Engram(X)`` (Engram layers only), then attention and MLP, each under a
    hyper-connection."""

    def __init__(self, config: EngramConfig, layer_id: int, engram_rows: int | None,
                 source: RowSource | None):
        super().__init__()
        eps = config.rms_norm_eps
        self.engram = (EngramModule(config, engram_rows, layer_id, source)
                       if engram_rows is not None else None)
        self.attn_norm = RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = MoE(config) if config.moe_num_experts > 0 else SwiGLU(config)
        self.hc_attn = HyperConnection(config, 2 * layer_id)
        self.hc_mlp = HyperConnection(config, 2 * layer_id + 1)

    def forward(self, streams: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate = None
        if self.engram is not None and rows is not None:
            out, gate = self.engram(streams, rows)
            streams = streams + out
        streams = self.hc_attn(streams, lambda x: self.attn(self.attn_norm(x), cos, sin))
        streams = self.hc_mlp(streams, lambda x: self.mlp(self.mlp_norm(x)))
        return streams, gate


class EngramModel(nn.Module):
    """The whole language model over raw token ids.

    Args:
        config: the model's settings.
        compression: int64 table raw token id -> compressed id (length ``config.vocab_size``),
            kept as a non-persistent buffer; it and the config fix every layer's row count.
        source: where the tables live (placement.py). None: they are parameters of the model,
            ``layers.{i}.engram.embed.weight`` (DeviceRows). A HostRows or MmapRows source keeps
            them outside: they are not parameters, not in ``state_dict()``, and ``.to()``
            leaves them where they are.
    """

    def __init__(self, config: EngramConfig, compression: np.ndarray,
                 source: RowSource | None = None):
        super().__init__()
        compression = np.asarray(compression)
        if compression.shape != (config.vocab_size,) or compression.dtype.kind not in "iu":
            raise BadInputError(f"compression: expected {config.vocab_size} integer ids "
                                f"(vocab_size), got shape {compression.shape} {compression.dtype}")
        compressed_vocab = int(compression.max()) + 1
        if config.engram_compressed_vocab_size not in (None, compressed_vocab):
            raise MismatchError(f"engram_compressed_vocab_size: config says "
                                f"{config.engram_compressed_vocab_size}, the compression table "
                                f"has {compressed_vocab}")
        self.config = config
        pad = int(compression[config.engram_pad_token_id])
        self.hasher = NgramHasher(config, compressed_vocab, pad)
        rows = [self.hasher.rows_per_layer[i] for i in config.engram_layer_ids]
        if config.engram_num_embeddings not in (None, rows):
            raise MismatchError(f"engram_num_embeddings: config says "
                                f"{config.engram_num_embeddings}, the hashing gives {rows}")
        self.register_buffer("compression", torch.from_numpy(compression.astype(np.int64)),
                             persistent=False)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if source is not None:
            bad = source.mismatches({i: (self.hasher.rows_per_layer[i], config.engram_head_dim)
                                   for i in config.engram_layer_ids})
            if bad:
                raise MismatchError(bad)
        self.layers = nn.ModuleList(
            Block(config, i, self.hasher.rows_per_layer.get(i), source)
            for i in range(config.num_hidden_layers))
        self.row_source = source if source is not None else DeviceRows(
            {i: self.layers[i].engram for i in config.engram_layer_ids})
        self.readout = LearnedReadout(config) if config.hc_readout == "learned" else None
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.init_weights()

    # --- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter; ``seed`` uses a private generator, else torch's global.

        - Linear weights and token embeddings N(0, 0.02), biases 0; o_proj and down_proj
          N(0, 0.02 / sqrt(2 * layers)) so the residual grows slowly with depth (GPT-2).
        - Table rows N(0, 0.02), like the token embeddings. Not zeros: equal rows would give
          every slot the same key, and the key RMSNorm of an all-zero input multiplies its
          gradient by 1/sqrt(eps). Small keeps Engram's value a small addition to the streams at
          first (0.02 * 0.02 * sqrt(E) per unit: a third of a token embedding for E = 256),
          while every row gets a gradient from the first step.
        - ShortConv weight 0: the module starts as the plain gated lookup ``o = u``; the conv
          weight still gets gradients (its input, the normed u, is not zero).
        - Norm weights 1; hyper-connections as described in HyperConnection.
        """
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = out_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, 0.0, std, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02, generator=gen)
            elif isinstance(module, nn.Conv1d):
                nn.init.zeros_(module.weight)
            elif isinstance(module, (RMSNorm, BranchRMSNorm)):
                nn.init.ones_(module.weight)
        for module in self.modules():  # after the Linear pass, which also met dyn_proj
            if isinstance(module, HyperConnection):
                module.reset_parameters()
        if self.readout is not None:
            nn.init.zeros_(self.readout.logits)

    # --- pieces other features use -----------------------------------------------------------
    def engram(self, layer_id: int) -> EngramModule:
        module = self.layers[layer_id].engram
        if module is None:
            raise BadInputError(f"layer {layer_id} has no Engram module "
                                f"(Engram layers: {self.config.engram_layer_ids})")
        return module

    def compute_rows(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Global table row of every column at every position: layer id -> ``[B, T, C]``."""
        return self.hasher.rows(self.compression[ids])

    def gather_rows(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        """Table lookup ``[B, T, C]`` -> ``[B, T, C*head_dim]``, rows in column order."""
        return self.engram(layer_id).gather(rows)

    def engram_value(self, layer_id: int, e: torch.Tensor) -> torch.Tensor:
        """Value projection (with bias) of gathered rows ``e [..., E]`` -> ``[..., hidden]``."""
        return self.engram(layer_id).value(e)

    def readout_logits(self, streams: torch.Tensor) -> torch.Tensor:
        """Logits of streams ``[B, T, n, D]`` as the model reads them: readout, norm, LM head."""
        x = streams.mean(-2) if self.readout is None else self.readout(streams)
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed_tokens.weight)
        return self.lm_head(x)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, memory: bool = True, return_gates: bool = False,
                rows: dict[int, torch.Tensor] | None = None) -> ModelOutput:
        """Logits of ``ids [B, T]``.

        Args:
            ids: raw token ids, int64 ``[B, T]``.
            memory: False skips every Engram module (ablation); all else is computed as usual.
            return_gates: also return each Engram layer's gates (an empty dict without memory).
            rows: precomputed ``compute_rows(ids)``; hashed from ``ids`` here when None.
        """
        b, t = ids.shape
        if memory and rows is None:
            rows = self.compute_rows(ids)  # depends on ids only: once, before any layer
        elif memory and rows is not None:
            missing = sorted(set(self.config.engram_layer_ids) - set(rows))
            if missing:
                raise BadInputError(f"rows: no row ids for Engram layer(s) {missing}")
        if memory:
            self.row_source.prefetch(rows)  # host placement: rows start moving to the device
        cos, sin = rope_tables(t, self.config.head_dim, self.config.rope_theta, ids.device)
        x = self.embed_tokens(ids)
        streams = x.unsqueeze(-2).expand(b, t, self.config.hc_mult, x.shape[-1])  # [B, T, n, D]
        gates: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.layers):
            layer_rows = rows.get(i) if memory and block.engram is not None else None
            streams, gate = block(streams, cos, sin, layer_rows)
            if gate is not None:
                gates[i] = gate
        return ModelOutput(self.readout_logits(streams), gates if return_gates else None)
