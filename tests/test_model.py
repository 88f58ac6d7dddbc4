import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.model import EngramModel, ModelOutput, pick_device
from engram_edit.model.engram import EngramModule
from engram_edit.model.hyper import HyperConnection, sinkhorn

VOCAB = 64
# ids 40..63 share compressed ids with 0..23, as merged tokens do after compression
COMPRESSION = np.array([i if i < 40 else i - 40 for i in range(VOCAB)], dtype=np.int64)


def _config(**overrides) -> EngramConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=64, engram_layer_ids=[0, 2],
                engram_max_ngram_size=3, engram_n_heads=2, engram_head_dim=8,
                engram_vocab_size=[31, 37], engram_pad_token_id=1)
    return EngramConfig(**{**base, **overrides})


def _model(seed: int = 0, randomize: bool = True, **overrides) -> EngramModel:
    """A tiny model; ``randomize`` moves every parameter off its init (zeros and ones included)."""
    torch.manual_seed(seed)
    model = EngramModel(_config(**overrides), COMPRESSION)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _ids(batch: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_logits_for_every_position():
    out = _model()(_ids())
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 12, VOCAB)
    assert out.gates is None


@pytest.mark.parametrize("t", [0, 1, 4, 7, 11])
def test_changing_token_t_leaves_every_earlier_logit_unchanged(t):
    model = _model().double()
    ids = _ids()
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 7) % VOCAB
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-10)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


def test_without_attention_a_token_reaches_at_most_11_positions_ahead_per_engram_layer():
    # attention's value path cut: only the n-gram lookback (2) and the ShortConv (3 taps at
    # dilation 3, 9 back) carry token 1 forward, through each of the 2 Engram layers
    model = _model().double()
    with torch.no_grad():
        for block in model.layers:
            block.attn.v_proj.weight.zero_()
    ids = _ids(t=30)
    changed = ids.clone()
    changed[:, 1] = (ids[:, 1] + 7) % VOCAB
    a, b = model(ids).logits, model(changed).logits
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-6
    torch.testing.assert_close(a[:, 24:], b[:, 24:], rtol=0, atol=1e-10)
    torch.testing.assert_close(a[:, :1], b[:, :1], rtol=0, atol=1e-10)


def test_memory_false_equals_the_model_with_its_engram_modules_removed():
    model = _model()
    ids = _ids()
    without = copy.deepcopy(model)
    for block in without.layers:
        block.engram = None
    ablated = model(ids, memory=False).logits
    assert torch.equal(ablated, without(ids).logits)
    assert (ablated - model(ids).logits).abs().max() > 1e-2


def test_precomputed_rows_give_the_same_logits_as_hashing_in_forward():
    model = _model()
    ids = _ids()
    rows = model.compute_rows(ids)
    expected = model.hasher.rows(COMPRESSION[ids.numpy()])
    assert sorted(rows) == [0, 2]
    for layer_id, r in rows.items():
        assert r.dtype == torch.int64 and r.shape == (2, 12, 4)
        assert np.array_equal(r.numpy(), expected[layer_id])
    assert torch.equal(model(ids, rows=rows).logits, model(ids).logits)
    with pytest.raises(BadInputError, match=r"layer\(s\) \[2\]"):
        model(ids, rows={0: rows[0]})


@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("hc_dynamic", [True, False])
@pytest.mark.parametrize("readout", ["mean", "learned"])
def test_hyper_connection_widths_run_and_every_parameter_gets_a_gradient(hc_mult, hc_dynamic,
                                                                          readout):
    model = _model(randomize=False, hc_mult=hc_mult, hc_dynamic=hc_dynamic, hc_readout=readout)
    ids = _ids()
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("conv_norm.weight"):  # feeds only the ShortConv, whose weight starts at 0
            assert p.grad.abs().max() == 0
        else:
            assert p.grad.abs().max() > 0, f"{name} gets no gradient at init"


def test_moe_blocks_run_backprop_and_name_their_experts():
    model = _model(moe_num_experts=4, moe_top_k=2)
    ids = _ids()
    logits = model(ids).logits
    assert logits.shape == (2, 12, VOCAB)
    logits.sum().backward()
    keys = model.state_dict().keys()
    assert "layers.1.mlp.router.weight" in keys
    assert "layers.1.mlp.experts.3.down_proj.weight" in keys
    assert "layers.1.mlp.gate_proj.weight" not in keys
    assert model.layers[1].mlp.router.weight.grad.abs().max() > 0


def test_gates_have_one_value_per_stream_strictly_between_0_and_1():
    out = _model()(_ids(), return_gates=True)
    assert sorted(out.gates) == [0, 2]
    for gate in out.gates.values():
        assert gate.shape == (2, 12, 4)
        assert ((gate > 0) & (gate < 1)).all()
    assert _model()(_ids(), memory=False, return_gates=True).gates == {}


def test_state_dict_names_and_shapes_are_the_file_format():
    model = _model(randomize=False)
    sd = model.state_dict()
    n, d, e = 4, 32, 4 * 8  # hc_mult, hidden, columns * head_dim
    rows = model.hasher.rows_per_layer
    assert rows == {0: 31 + 37 + 41 + 43, 2: 47 + 53 + 59 + 61}  # sum of the layer's primes
    expected = {
        "embed_tokens.weight": (VOCAB, d), "norm.weight": (d,),
        "layers.0.engram.embed.weight": (rows[0], 8), "layers.2.engram.embed.weight": (rows[2], 8),
        "layers.0.engram.value_proj.weight": (d, e), "layers.0.engram.value_proj.bias": (d,),
        "layers.0.engram.key_proj.weight": (n * d, e), "layers.0.engram.key_proj.bias": (n * d,),
        "layers.0.engram.key_norm.weight": (n, d), "layers.0.engram.query_norm.weight": (n, d),
        "layers.0.engram.conv_norm.weight": (n, d), "layers.0.engram.conv.weight": (n * d, 1, 4),
        "layers.1.attn_norm.weight": (d,), "layers.1.mlp_norm.weight": (d,),
        "layers.1.attn.q_proj.weight": (d, d), "layers.1.attn.o_proj.weight": (d, d),
        "layers.1.mlp.gate_proj.weight": (48, d), "layers.1.mlp.down_proj.weight": (d, 48),
        "layers.1.hc_attn.pre_logits": (n,), "layers.1.hc_attn.post_logits": (n,),
        "layers.1.hc_attn.res_logits": (n, n), "layers.1.hc_attn.dyn_proj.weight": (2 * n, n * d),
        "layers.1.hc_mlp.res_logits": (n, n),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("layers.1.engram") for k in sd)
    assert not any(k.endswith("bias") and ".engram." not in k for k in sd)
    assert "compression" not in sd and "lm_head.weight" not in sd
    untied = _model(randomize=False, tie_word_embeddings=False, hc_readout="learned").state_dict()
    assert untied["lm_head.weight"].shape == (VOCAB, d)
    assert untied["readout.logits"].shape == (n,)


def test_wrong_compression_or_row_counts_are_refused_with_the_key_named():
    with pytest.raises(BadInputError, match="compression: expected 64"):
        EngramModel(_config(), COMPRESSION[:10])
    with pytest.raises(MismatchError, match="engram_num_embeddings"):
        EngramModel(_config(engram_num_embeddings=[1, 2]), COMPRESSION)
    with pytest.raises(MismatchError, match="engram_compressed_vocab_size"):
        EngramModel(_config(engram_compressed_vocab_size=64), COMPRESSION)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


def _engram_reference(mod: EngramModule, streams: torch.Tensor,
                      rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/engram.md section 5, one position and one branch at a time."""
    mod = copy.deepcopy(mod).requires_grad_(False)
    bsz, t_len, n, d = streams.shape
    eps = torch.finfo(streams.dtype).eps  # torch's default for the key and query norms
    w_k, b_k = mod.key_proj.weight, mod.key_proj.bias
    u = torch.zeros_like(streams)
    alpha = torch.zeros(bsz, t_len, n, dtype=streams.dtype)
    for bi in range(bsz):
        for t in range(t_len):
            e = torch.cat([mod.embed.weight[r] for r in rows[bi, t]])
            v = mod.value_proj.weight @ e + mod.value_proj.bias
            for b in range(n):
                k = _rms(w_k[b * d:(b + 1) * d] @ e + b_k[b * d:(b + 1) * d],
                         mod.key_norm.weight[b], eps)
                q = _rms(streams[bi, t, b], mod.query_norm.weight[b], eps)
                g = float(k @ q) / math.sqrt(d)
                g = math.copysign(math.sqrt(max(abs(g), 1e-6)), g)
                alpha[bi, t, b] = 1 / (1 + math.exp(-g))
                u[bi, t, b] = alpha[bi, t, b] * v
    normed = torch.zeros_like(u)
    for bi in range(bsz):
        for t in range(t_len):
            for b in range(n):
                normed[bi, t, b] = _rms(u[bi, t, b], mod.conv_norm.weight[b], 1e-5)
    channels = normed.reshape(bsz, t_len, n * d)  # channel = b * hidden + i
    w = mod.conv.weight[:, 0, :]
    kernel, dil = w.shape[1], mod.dilation
    conv = torch.zeros_like(channels)
    for t in range(t_len):
        for j in range(kernel):
            src = t - (kernel - 1 - j) * dil
            if src >= 0:
                conv[:, t] += w[:, j] * channels[:, src]
    return u + F.silu(conv).reshape(bsz, t_len, n, d), alpha


@pytest.mark.parametrize("hc_mult", [1, 3])
def test_engram_module_matches_a_per_position_reference_of_the_spec(hc_mult):
    config = _config(hc_mult=hc_mult)
    torch.manual_seed(3)
    mod = EngramModule(config, num_rows=50).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.5 * torch.randn_like(p))
    streams = torch.randn(2, 11, hc_mult, 32, dtype=torch.float64)
    rows = torch.randint(0, 50, (2, 11, config.engram_columns))
    out, alpha = mod(streams, rows)
    ref_out, ref_alpha = _engram_reference(mod, streams, rows)
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)


def test_hyper_connection_matches_its_formula():
    config = _config()
    torch.manual_seed(4)
    hc = HyperConnection(config, index=5).double()
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 4, 32, dtype=torch.float64)
    lin = torch.nn.Linear(32, 32).double()
    out = hc(x, lin)
    flat = x.flatten(-2)
    dyn = (flat / flat.pow(2).mean(-1, keepdim=True).add(config.rms_norm_eps).sqrt()) \
        @ hc.dyn_proj.weight.T
    a = torch.sigmoid(hc.pre_logits + dyn[..., :4])
    b = 2 * torch.sigmoid(hc.post_logits + dyn[..., 4:])
    h_res = sinkhorn(hc.res_logits, config.hc_sinkhorn_iters)
    y = lin(torch.einsum("btn,btnd->btd", a, x))
    expected = torch.einsum("ij,btjd->btid", h_res, x) + b[..., None] * y[:, :, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_sinkhorn_makes_a_doubly_stochastic_matrix():
    m = sinkhorn(torch.randn(4, 4, dtype=torch.float64) * 2, iters=30)
    torch.testing.assert_close(m.sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(m.sum(-2), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (m > 0).all()


def test_untrained_model_computes_what_a_plain_pre_norm_transformer_computes():
    # at init the 4 streams stay identical copies, so hc_mult 4 must match hc_mult 1 (whose
    # sublayers read the stream itself, not a weighted sum: a tiny eps makes scale irrelevant)
    wide = _model(randomize=False, hc_mult=4, rms_norm_eps=1e-30).double()
    plain = EngramModel(_config(hc_mult=1, rms_norm_eps=1e-30), COMPRESSION).double()
    backbone = {k: v for k, v in wide.state_dict().items()
                if ".hc_" not in k and ".engram." not in k}
    plain.load_state_dict(backbone, strict=False)
    ids = _ids()
    torch.testing.assert_close(wide(ids, memory=False).logits, plain(ids, memory=False).logits,
                               rtol=0, atol=1e-9)
    loss = F.cross_entropy(wide(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - math.log(VOCAB)) < 0.1


def test_init_weights_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone():
    a, b = _model(randomize=False), _model(seed=5, randomize=False)
    state = torch.get_rng_state()
    a.init_weights(seed=11)
    b.init_weights(seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.layers[0].engram.conv.weight.abs().max() == 0
    assert 0.015 < a.layers[0].engram.embed.weight.std() < 0.025


def test_logit_lens_helpers_reuse_the_models_own_pieces():
    model = _model()
    ids = _ids()
    rows = model.compute_rows(ids)[2]
    e = model.gather_rows(2, rows)
    table = model.layers[2].engram.embed.weight
    assert torch.equal(e, torch.cat([table[rows[..., c]] for c in range(4)], -1))
    torch.testing.assert_close(model.engram_value(2, e),
                               e @ model.layers[2].engram.value_proj.weight.T
                               + model.layers[2].engram.value_proj.bias)
    final = []
    model.layers[-1].register_forward_hook(lambda m, i, o: final.append(o[0]))
    logits = model(ids).logits
    torch.testing.assert_close(model.readout_logits(final[0]), logits, rtol=0, atol=1e-5)
    with pytest.raises(BadInputError, match="layer 1 has no Engram module"):
        model.gather_rows(1, rows)


def test_bfloat16_autocast_on_cpu_stays_close_to_float32():
    model = _model(randomize=False)
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, return_gates=True)
    high = model(ids, return_gates=True)
    assert torch.isfinite(low.logits).all()
    assert (low.logits.float() - high.logits).abs().max() < 0.05
    assert (low.gates[0].float() - high.gates[0]).abs().max() < 0.05


def test_pick_device_prefers_cuda_only_when_present_and_refuses_bad_names():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device(None).type == expected and pick_device("auto").type == expected
    with pytest.raises(BadInputError, match="not a torch device"):
        pick_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu():
    model = _model()
    ids = _ids()
    cpu = model(ids, return_gates=True)
    cuda = model.to("cuda")(ids.to("cuda"), return_gates=True)
    torch.testing.assert_close(cuda.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cuda.gates[2].cpu(), cpu.gates[2], rtol=1e-3, atol=1e-3)
