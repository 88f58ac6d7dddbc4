"""What the memory holds for a text: tokens, n-grams, slots, rows, a logit lens over rows, gates.

Rows are read by offset through MemoryTable, only those shown. With a backbone, rows are also
decoded (``decode_rows``) and the text runs through the model for gates and predictions; with a
split memory alone nothing here imports torch. docs/engram.md sections 4-6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engram_edit.checkpoint import MemoryFiles, ModelFiles, build_model
from engram_edit.config import EngramConfig
from engram_edit.errors import BadInputError
from engram_edit.hashing import NgramHashes, explain
from engram_edit.index import NgramIndex
from engram_edit.tokenizer import EngramTokenizer, compression_normalizer

if TYPE_CHECKING:
    import torch

    from engram_edit.model import EngramModel, ModelOutput

FIRST_VALUES = 8  # values of a row shown by ``read_rows`` unless ``full``


@dataclass
class TokenProb:
    id: int
    token: str  # the text the token decodes to
    prob: float


@dataclass
class Prediction:
    """The model's next-token distribution after one position, with the memory on and off."""

    memory_on: list[TokenProb]
    memory_off: list[TokenProb]


@dataclass
class RawToken:
    id: int
    text: str


@dataclass
class TokenInfo:
    id: int  # raw tokenizer id
    text: str
    compressed_id: int
    merged: list[RawToken]  # every raw token compressed to ``compressed_id``, this one included
    prediction: Prediction | None = None  # None without a backbone


@dataclass
class SharedNgram:
    ngram: str  # as the hash sees it: decoded, then the compression normal form
    count: int  # occurrences in the indexed corpus


def _shared(index: NgramIndex, layer_id: int, row: int, top_k: int,
            exclude: list[tuple[int, ...]]) -> tuple[list[SharedNgram], int, int]:
    """The other n-grams that read a row, and the slot's load (distinct n-grams, occurrences)."""
    shared = [SharedNgram(s.text, s.count)
              for s in index.sharers(layer_id, row, top_k=top_k, exclude=exclude)]
    load = index.slot_load(layer_id, row)
    return shared, load.ngrams, load.occurrences


@dataclass
class HeadRow:
    head: int
    column: int  # (order - 2) * heads + head
    slot: int  # row within the column
    row: int  # global row in the layer's table: column offset + slot
    norm: float  # L2 norm of the stored row, decoded to float32
    # With a corpus n-gram index: the other indexed n-grams that read this row (most frequent
    # first), and how crowded the slot is (distinct n-grams, their summed occurrences).
    sharers: list[SharedNgram] | None = None
    slot_ngrams: int | None = None
    slot_occurrences: int | None = None


@dataclass
class NgramLookup:
    position: int  # index in the token list of the n-gram's last token
    order: int
    tokens: list[str]  # token texts; the pad token stands where the n-gram reaches before the text
    text: str  # the n-gram as the hash sees it: decoded, then the compression normal form
    padded: bool
    heads: list[HeadRow]
    decoded: list[TokenProb] | None = None  # logit lens (decode_rows); None without a backbone
    gate: list[float] | None = None  # gate per hyper-connection branch at ``position``


@dataclass
class LayerLookup:
    layer_id: int
    ngrams: list[NgramLookup]


@dataclass
class LookupResult:
    text: str
    context: str | None
    tokens: list[TokenInfo]
    layers: list[LayerLookup]
    backbone: bool  # False: a split memory alone (no decoded rows, gates or predictions)


@dataclass
class GateLayer:
    layer_id: int
    gates: list[list[float]]  # [position][branch]
    values: list[float]  # per position: the mean over branches, or the chosen branch


@dataclass
class GatesResult:
    text: str
    context: str | None
    token_ids: list[int]
    tokens: list[str]
    branch: int | None  # None: ``values`` are means over branches
    layers: list[GateLayer]


@dataclass
class RowInfo:
    row: int
    column: int
    order: int
    head: int
    slot: int
    norm: float
    values: list[float]  # the first FIRST_VALUES values, or all with ``full``
    sharers: list[SharedNgram] | None = None  # indexed n-grams reading this row (with an index)
    slot_ngrams: int | None = None
    slot_occurrences: int | None = None
    decoded: list[TokenProb] | None = None  # logit lens of the row alone in its column


@dataclass
class RowsResult:
    layer_id: int
    dtype: str  # row dtype as stored
    width: int
    num_rows: int  # rows in the layer's table
    rows: list[RowInfo]


# --- checks ----------------------------------------------------------------------------------

def _check_text(text: str, tokenizer: EngramTokenizer) -> list[int]:
    if not text:
        raise BadInputError("the text is empty: give the text to look up")
    ids = tokenizer.encode(text)
    if not ids:
        raise BadInputError(f"the text {text!r} encodes to no tokens")
    return ids


def _check_layers(config: EngramConfig, layers: list[int] | None) -> list[int]:
    ids = config.engram_layer_ids
    if layers is None:
        return list(ids)
    bad = [i for i in layers if i not in ids]
    if bad:
        raise BadInputError([f"layer {i} is not an Engram layer (Engram layers: {ids})"
                             for i in bad])
    return [i for i in ids if i in layers]


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise BadInputError(f"top K must be at least 1, got {top_k}")


def _backbone(files: ModelFiles | MemoryFiles, model: EngramModel | None) -> bool:
    if isinstance(files, ModelFiles):
        return True
    if model is not None:
        raise BadInputError(f"{files.path}: a memory alone has no backbone to go with the given "
                            f"model; open the model directory with the memory plugged in")
    return False


# --- the logit lens --------------------------------------------------------------------------

def decode_rows(model: EngramModel, layer_id: int, columns: list[int],
                rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """What rows say about the next token: the logit lens over Engram memory.

    The rows go into their columns of the layer's gathered input ``e`` (every other column
    zero), through the value projection with its bias, and are added with gate 1 to every
    hyper-connection stream of otherwise empty streams (ShortConv left out); the streams are
    then read as the model reads its streams (readout, final norm, LM head) and softmaxed.
    No gradient mode is set here, so edits can optimise rows through it.

    Args:
        model (`EngramModel`): the model whose value projection and head read the rows.
        layer_id (`int`): an Engram layer of ``model``.
        columns (`list[int]`): the column of each row, ``(order - 2) * heads + head``, distinct.
        rows (`torch.Tensor | np.ndarray`): float ``[..., len(columns), head_dim]``.

    Returns:
        `torch.Tensor`: float32 probabilities ``[..., vocab_size]`` on the model's device.

    Raises:
        BadInputError: a layer without Engram, a bad or repeated column, rows of the wrong shape.

    Example:
        >>> rows = table.read_rows(0, np.array([5, 40]))  # doctest: +SKIP
        >>> decode_rows(model, 0, [0, 1], rows).topk(5)  # doctest: +SKIP
    """
    import torch

    config = model.config
    engram = model.engram(layer_id)
    weight = engram.value_proj.weight
    bad = [c for c in columns if not 0 <= c < config.engram_columns]
    if bad or len(set(columns)) != len(columns):
        raise BadInputError(f"layer {layer_id}: columns {columns} must be distinct and within "
                            f"0..{config.engram_columns - 1}")
    x = torch.as_tensor(rows).to(device=weight.device, dtype=weight.dtype)
    if x.ndim < 2 or tuple(x.shape[-2:]) != (len(columns), config.engram_head_dim):
        raise BadInputError(f"layer {layer_id}: rows must be [..., {len(columns)}, "
                            f"{config.engram_head_dim}], got shape {list(x.shape)}")
    e = x.new_zeros(*x.shape[:-2], config.engram_columns, config.engram_head_dim)
    e[..., columns, :] = x
    v = model.engram_value(layer_id, e.flatten(-2))  # [..., hidden]
    streams = v.unsqueeze(-2).expand(*v.shape[:-1], config.hc_mult, v.shape[-1])  # [..., n, D]
    return torch.softmax(model.readout_logits(streams).float(), dim=-1)


def _token(tokenizer: EngramTokenizer, raw_id: int) -> str:
    return tokenizer.token_text(raw_id) if raw_id < tokenizer.vocab_size else ""


def _top(probs: torch.Tensor, k: int, tokenizer: EngramTokenizer) -> list[list[TokenProb]]:
    """The ``k`` most likely tokens of each row of ``probs [N, vocab]``."""
    values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[TokenProb(i, _token(tokenizer, i), p) for p, i in zip(pr, ir, strict=True)]
            for pr, ir in zip(values.cpu().tolist(), ids.cpu().tolist(), strict=True)]


def _top_numpy(probs: np.ndarray, k: int, tokenizer: EngramTokenizer) -> list[TokenProb]:
    """The ``k`` most likely tokens of one distribution ``probs [vocab]`` (no torch)."""
    ids = np.argsort(-probs, kind="stable")[:k]
    return [TokenProb(int(i), _token(tokenizer, int(i)), float(probs[i])) for i in ids]


def _foreign_lens(files: ModelFiles, result: LookupResult,
                  values: dict[int, dict[int, np.ndarray]], top_k: int) -> None:
    """``decoded`` of every n-gram of a checkpoint read in place (a DeepSeek-V4.1 directory):
    the layout's own lens over value projection, final norm and LM head; no gates there."""
    from engram_edit.layouts.lens import lens_probs

    for layer in result.layers:
        for g in layer.ngrams:
            rows = np.stack([values[layer.layer_id][h.row] for h in g.heads])
            probs = lens_probs(files, layer.layer_id, [h.column for h in g.heads], rows[None])
            g.decoded = _top_numpy(probs[0], top_k, files.tokenizer)


def _model_for(files: ModelFiles, model: EngramModel | None, device: str | None) -> EngramModel:
    return model if model is not None else build_model(files, device)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one CPU thread, restored after. The inputs here are a few tokens: more threads
    only add synchronisation, and on a busy machine they wait on each other for far longer
    than the work takes (measured: 0.55 s instead of 0.03 s per lookup on 2 loaded cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(model: EngramModel, ids: list[int], memory: bool) -> ModelOutput:
    import torch

    device = model.embed_tokens.weight.device
    return model(torch.tensor([ids], device=device), memory=memory, return_gates=memory)


# --- lookup ----------------------------------------------------------------------------------

def _ngram_text(tokenizer: EngramTokenizer, raw_ids: list[int]) -> str:
    text = tokenizer.decode(raw_ids)
    return compression_normalizer().normalize_str(text) or text


def _heads(h: NgramHashes, n_heads: int, norms: dict[int, float],
           index: NgramIndex | None, own: tuple[int, ...], sharers: int) -> list[HeadRow]:
    heads = []
    for j in range(n_heads):
        head = HeadRow(j, h.columns[j], h.slots[j], h.rows[j], norms[h.rows[j]])
        if index is not None:
            head.sharers, head.slot_ngrams, head.slot_occurrences = _shared(
                index, h.layer_id, head.row, sharers, [own])
        heads.append(head)
    return heads


def lookup(files: ModelFiles | MemoryFiles, text: str, layers: list[int] | None = None,
           top_k: int = 5, include_padded: bool = False, context: str | None = None,
           model: EngramModel | None = None, device: str | None = None,
           index: NgramIndex | None = None, sharers: int = 3) -> LookupResult:
    """Every n-gram of ``text`` with its slots, rows and norms; with a backbone, what the rows
    say (``decode_rows``), the gates, and the prediction with the memory on and off.

    Tokens, n-grams and slots are those of ``text`` alone, exactly as ``hashing.explain`` gives
    them. Gates and predictions come from running ``context`` (encoded on its own) followed by
    the text's tokens through the model, so n-grams at the start of the text see the context.

    Args:
        files (`ModelFiles | MemoryFiles`): a model (optionally with a memory plugged in), or a
            split memory alone: then only tokens, slots, rows and norms, and torch is not
            imported.
        text (`str`): encoded without special tokens, nothing stripped.
        layers (`list[int] | None`): Engram layer ids to show; all when None.
        top_k (`int`, defaults to 5): tokens per decoded distribution.
        include_padded (`bool`, defaults to False): also the n-grams that reach back before
            the text (padded with the pad token).
        context (`str | None`): text before ``text`` when the model runs.
        model (`EngramModel | None`): the model built from ``files``, to reuse; built on
            ``device`` when None.
        device (`str | None`): torch device when the model is built here.
        index (`NgramIndex | None`): a corpus n-gram index; with one, every head also lists
            the ``sharers`` most frequent other n-grams that read its row and the slot's load.
        sharers (`int`, defaults to 3): sharers listed per head.

    Returns:
        `LookupResult`

    Raises:
        BadInputError: empty text, a layer that is not an Engram layer, ``top_k`` below 1.

    Example:
        >>> r = lookup(open_model("my-model"), "Princess of Wales")  # doctest: +SKIP
        >>> r.layers[0].ngrams[-1].decoded[0].token  # doctest: +SKIP
    """
    tokenizer, config = files.tokenizer, files.config
    raw = _check_text(text, tokenizer)
    layer_ids = _check_layers(config, layers)
    _check_top_k(top_k)
    backbone = _backbone(files, model)
    hashes = explain(text, tokenizer, files.hasher, config.engram_pad_token_id)
    shown = {lid: [h for h in hashes.ngrams
                   if h.layer_id == lid and (include_padded or not h.padded)]
             for lid in layer_ids}
    wanted = {lid: np.unique([r for h in hs for r in h.rows]).astype(np.int64)
              for lid, hs in shown.items()}
    values: dict[int, dict[int, np.ndarray]] = {}
    with files.table() as table:
        norms = {lid: dict(zip(rows.tolist(), table.norms(lid, rows).tolist(), strict=True))
                 for lid, rows in wanted.items()}
        if backbone:
            values = {lid: dict(zip(rows.tolist(), table.read_rows(lid, rows), strict=True))
                      for lid, rows in wanted.items()}
    tokens = [TokenInfo(i, _token(tokenizer, i), c,
                        [RawToken(m, _token(tokenizer, m)) for m in tokenizer.merged_with(c)])
              for i, c in zip(raw, hashes.compressed_ids, strict=True)]
    result_layers = [
        LayerLookup(lid, [NgramLookup(h.position, h.order, h.tokens,
                                      _ngram_text(tokenizer, h.raw_ids), h.padded,
                                      _heads(h, config.engram_n_heads, norms[lid], index,
                                             tuple(tokenizer.compress(h.raw_ids).tolist()),
                                             sharers))
                          for h in hs])
        for lid, hs in shown.items()]
    result = LookupResult(text, context or None, tokens, result_layers, backbone)
    if backbone and files.layout != "engram-edit":
        _foreign_lens(files, result, values, top_k)
    elif backbone:
        assert isinstance(files, ModelFiles)
        with _one_thread():
            _measure(result, _model_for(files, model, device), tokenizer, values, top_k)
    return result


def _measure(result: LookupResult, model: EngramModel, tokenizer: EngramTokenizer,
             values: dict[int, dict[int, np.ndarray]], top_k: int) -> None:
    """Fill in decoded rows, gates and predictions (the torch half of ``lookup``)."""
    import torch

    before = tokenizer.encode(result.context) if result.context else []
    ids = before + [t.id for t in result.tokens]
    start = len(before)
    with torch.inference_mode():
        on = _run(model, ids, memory=True)
        off = _run(model, ids, memory=False)
        tops_on = _top(torch.softmax(on.logits[0, start:].float(), -1), top_k, tokenizer)
        tops_off = _top(torch.softmax(off.logits[0, start:].float(), -1), top_k, tokenizer)
        for token, p_on, p_off in zip(result.tokens, tops_on, tops_off, strict=True):
            token.prediction = Prediction(p_on, p_off)
        for layer in result.layers:
            gates = on.gates[layer.layer_id][0, start:].float().cpu().tolist()  # [T, hc]
            orders = sorted({g.order for g in layer.ngrams})
            for order in orders:
                group = [g for g in layer.ngrams if g.order == order]
                rows = np.stack([np.stack([values[layer.layer_id][h.row] for h in g.heads])
                                 for g in group])  # [N, heads, head_dim]
                columns = [h.column for h in group[0].heads]
                probs = decode_rows(model, layer.layer_id, columns, rows)
                for g, top in zip(group, _top(probs, top_k, tokenizer), strict=True):
                    g.decoded = top
            for g in layer.ngrams:
                g.gate = gates[g.position]


# --- gates -----------------------------------------------------------------------------------

def gates(files: ModelFiles | MemoryFiles, text: str, context: str | None = None,
          layers: list[int] | None = None, branch: int | None = None,
          model: EngramModel | None = None, device: str | None = None) -> GatesResult:
    """The gate of every Engram layer at every token of ``text`` (docs/engram.md section 5).

    Args:
        files (`ModelFiles`): a model; a memory alone has no gates.
        text (`str`): encoded without special tokens, nothing stripped.
        context (`str | None`): text run before ``text`` (encoded on its own); not shown.
        layers (`list[int] | None`): Engram layer ids; all when None.
        branch (`int | None`): the hyper-connection branch whose gate is ``values``; None
            averages over branches.
        model (`EngramModel | None`): the model built from ``files``, to reuse.
        device (`str | None`): torch device when the model is built here.

    Returns:
        `GatesResult`: per layer, per position, the gate of every branch and the shown value.

    Raises:
        BadInputError: empty text, a memory alone, a layer or branch that does not exist.
    """
    import torch

    if not isinstance(files, ModelFiles):
        raise BadInputError(f"{files.path}: gates need a backbone; give --model (with --memory "
                            f"to plug this memory in)")
    tokenizer, config = files.tokenizer, files.config
    raw = _check_text(text, tokenizer)
    layer_ids = _check_layers(config, layers)
    if branch is not None and not 0 <= branch < config.hc_mult:
        raise BadInputError(f"branch {branch} does not exist (hc_mult is {config.hc_mult}: "
                            f"branches 0..{config.hc_mult - 1})")
    before = tokenizer.encode(context) if context else []
    with _one_thread(), torch.inference_mode():
        out = _run(_model_for(files, model, device), before + raw, memory=True)
    out_layers = []
    for lid in layer_ids:
        g = out.gates[lid][0, len(before):].float().cpu()  # [T, hc]
        shown = g.mean(-1) if branch is None else g[:, branch]
        out_layers.append(GateLayer(lid, g.tolist(), shown.tolist()))
    return GatesResult(text, context or None, raw, [_token(tokenizer, i) for i in raw], branch,
                       out_layers)


# --- rows ------------------------------------------------------------------------------------

def read_rows(files: ModelFiles | MemoryFiles, layer_id: int, rows: list[int],
              full: bool = False, top_k: int = 5, model: EngramModel | None = None,
              device: str | None = None, index: NgramIndex | None = None,
              sharers: int = 5) -> RowsResult:
    """Stored rows of one layer: where each sits, its norm, its values, and (with a backbone)
    what it says alone in its column (``decode_rows``).

    Args:
        files (`ModelFiles | MemoryFiles`): a model, or a split memory alone (no decoding, no
            torch).
        layer_id (`int`): an Engram layer.
        rows (`list[int]`): global row ids of that layer's table.
        full (`bool`, defaults to False): every value instead of the first FIRST_VALUES.
        top_k (`int`, defaults to 5): decoded tokens per row.
        model (`EngramModel | None`): the model built from ``files``, to reuse.
        device (`str | None`): torch device when the model is built here.
        index (`NgramIndex | None`): with a corpus n-gram index, each row also lists the
            ``sharers`` most frequent n-grams that read it and how crowded its slot is.
        sharers (`int`, defaults to 5): n-grams listed per row.

    Returns:
        `RowsResult`

    Raises:
        BadInputError: no rows, a layer that is not an Engram layer, rows out of range (all
            named at once), ``top_k`` below 1.
    """
    config, hasher = files.config, files.hasher
    _check_layers(config, [layer_id])
    _check_top_k(top_k)
    if not rows:
        raise BadInputError(f"layer {layer_id}: give at least one row id")
    n = hasher.rows_per_layer[layer_id]
    bad = sorted({r for r in rows if not 0 <= r < n})
    if bad:
        raise BadInputError([f"layer {layer_id}: row {r} is out of range (the table has {n} "
                             f"rows: 0..{n - 1})" for r in bad])
    backbone = _backbone(files, model)
    ids = np.asarray(rows, dtype=np.int64)
    with files.table() as table:
        vals = table.read_rows(layer_id, ids)
        norms = table.norms(layer_id, ids).tolist()
        dtype = table.dtype(layer_id)
    infos = []
    for r, v, norm in zip(rows, vals, norms, strict=True):
        column, slot = hasher.locate(layer_id, r)
        order, head = hasher.column_order_head(column)
        shown = v if full else v[:FIRST_VALUES]
        info = RowInfo(int(r), column, order, head, slot, norm, shown.tolist())
        if index is not None:
            info.sharers, info.slot_ngrams, info.slot_occurrences = _shared(
                index, layer_id, int(r), sharers, [])
        infos.append(info)
    if backbone and files.layout != "engram-edit":
        from engram_edit.layouts.lens import lens_probs

        for info, v in zip(infos, vals, strict=True):
            probs = lens_probs(files, layer_id, [info.column], v[None, None, :])
            info.decoded = _top_numpy(probs[0], top_k, files.tokenizer)
    elif backbone:
        import torch

        assert isinstance(files, ModelFiles)
        with _one_thread(), torch.inference_mode():
            model = _model_for(files, model, device)
            for info, v in zip(infos, vals, strict=True):
                probs = decode_rows(model, layer_id, [info.column], v[None, :])
                info.decoded = _top(probs[None, :], top_k, files.tokenizer)[0]
    return RowsResult(layer_id, dtype, config.engram_head_dim, n, infos)
