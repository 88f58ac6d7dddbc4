"""Row search: which table rows (and, with a corpus index, which n-grams) push the model hardest
toward a given next token. A faiss inner-product index over each row's push in output space;
see ``RowSearch`` for the definition. The n-gram index itself is index.py's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engram_edit.checkpoint import ModelFiles
from engram_edit.errors import BadInputError
from engram_edit.index import NgramIndex, Sharer, SlotLoad
from engram_edit.index_corpus import read_documents
from engram_edit.tokenizer import EngramTokenizer

if TYPE_CHECKING:
    from engram_edit.model import EngramModel

NGRAM_POOL = 256  # n-grams with the best lens push that search runs through the model
SERIAL_SCAN = 1 << 24  # multiply-adds of one query over one column searched on one thread


@dataclass
class TokenPush:
    id: int
    token: str  # the text the token decodes to ("" without a tokenizer)
    push: float  # centered logit push (see RowSearch)


@dataclass
class RowHit:
    layer_id: int
    row: int
    column: int
    order: int
    head: int
    slot: int
    score: float  # push toward the token in logits (see RowSearch)
    top_tokens: list[TokenPush]  # the tokens this row pushes hardest
    sharers: list[Sharer] | None = None  # with an index: the n-grams that read the row
    load: SlotLoad | None = None


@dataclass
class NgramHit:
    layer_id: int  # the layer whose rows push it hardest (``push``, ``rows``)
    text: str
    ids: list[int]  # compressed ids
    count: int  # occurrences in the indexed corpus
    push: float  # the summed score of the rows its heads read in this layer
    rows: list[int]  # the row each head reads in this layer
    prob: float  # probability of the token right after the n-gram read alone, memory on
    effect: float  # ``prob`` minus the same with every Engram layer off


@dataclass
class SearchResult:
    query: str
    token_id: int
    token: str
    query_tokens: list[str]  # what the query encodes to; the search uses the first
    scale: float  # the typical RMS of the final norm's input used for the scores
    hits: list[RowHit] = field(default_factory=list)
    ngrams: list[NgramHit] | None = None  # with an index: the n-grams that push hardest


def resolve_token(tokenizer: EngramTokenizer, query: str) -> tuple[int, list[int]]:
    """The token a query means: its encoding when that is one token, else the vocab entry
    spelled exactly so (e.g. "ĠEmpire"), else the first token of its encoding."""
    ids = tokenizer.encode(query) if query else []
    if len(ids) != 1:
        exact = tokenizer.token_id(query) if query else None
        if exact is not None:
            return exact, [exact]
    if not ids:
        raise BadInputError(f"{query!r} encodes to no tokens: give a token or a text")
    return ids[0], ids


class RowSearch:
    """Exact inner-product search over every row's push on the next-token logits.

    A row ``r`` in column ``c`` of a layer adds ``W_c r`` to the value ``v`` (``W_c``: the
    value projection's columns for ``c``), and ``v`` reaches the residual streams with gate
    <= 1 (docs/engram.md section 5). Read out as the model reads its streams at the last layer, with
    gate 1 and no later block, its push on the logits is linear:
    ``rho * H diag(g) W_c r / s``, where ``g`` is the final RMSNorm's weight, ``H`` the LM head,
    ``rho`` what the readout makes of equal streams (1 for "mean") and ``s`` the final norm's
    divisor, which depends on the whole residual, not on one row: it is taken as its typical
    value, the median over the positions of calibration text. The bias ``b_v`` is left out
    because every lookup adds it, whichever rows it reads. Logits are centered (the mean head
    row subtracted) because a push shared by every token changes no probability.

    The score of row ``r`` for token ``t`` is then ``a_{c,t} . r`` with
    ``a_{c,t} = rho / s * W_c^T diag(g) (h_t - mean(h))``: a query of width ``head_dim`` per
    column, searched with a faiss ``IndexFlatIP`` over that column's rows (exact; on the GPU
    when faiss has one). The per-row logit lens of ``inspect.decode_rows`` (bias included,
    each row normalised alone) answers "what does this row say"; this answers "which rows push
    hardest", so a large row outranks a faint one pointing the same way.
    """

    def __init__(self, rows: dict[int, np.ndarray], offsets: dict[int, np.ndarray],
                 primes: dict[int, np.ndarray], projections: dict[int, np.ndarray],
                 head: np.ndarray, scale: float, n_heads: int,
                 tokenizer: EngramTokenizer | None = None):
        """Low-level constructor; ``build`` makes one from a model.

        Args:
            rows: layer id -> its table as float32 ``[rows, head_dim]``.
            offsets, primes: layer id -> first row and row count of each column.
            projections: layer id -> ``[columns, head_dim, hidden]``, ``rho / s * W_c^T diag(g)``.
            head: centered LM head ``[vocab, hidden]`` float32.
            scale: the ``s`` folded into ``projections`` (reported only).
            n_heads: hash heads per n-gram order.
            tokenizer: names the tokens of ``RowHit.top_tokens`` when given.
        """
        import faiss

        self.rows, self.offsets, self.primes = rows, offsets, primes
        self.projections, self.head, self.scale, self.n_heads = projections, head, scale, n_heads
        self.tokenizer = tokenizer
        gpu = faiss.StandardGpuResources() if _faiss_gpus(faiss) else None
        self.indexes: dict[int, list[Any]] = {}
        for lid, table in rows.items():
            self.indexes[lid] = []
            for c, (a, p) in enumerate(zip(offsets[lid], primes[lid], strict=True)):
                index = faiss.IndexFlatIP(table.shape[1])
                index.add(np.ascontiguousarray(table[a:a + p]))
                self.indexes[lid].append(faiss.index_cpu_to_gpu(gpu, 0, index) if gpu else index)
                assert self.indexes[lid][c].ntotal == p, "a column's index lost rows"

    @classmethod
    def build(cls, model: EngramModel, scale: float | None = None,
              calibration: Sequence[str] | None = None,
              tokenizer: EngramTokenizer | None = None) -> RowSearch:
        """Index every row of every Engram layer of ``model``.

        Args:
            model (`EngramModel`): the model; rows and weights are copied to float32 numpy.
            scale (`float | None`): the final norm's divisor ``s``; measured when None.
            calibration (`Sequence[str] | None`): texts to measure ``s`` on (needs
                ``tokenizer``); default: the first documents of the bundled held-out file.
            tokenizer (`EngramTokenizer | None`): encodes ``calibration`` and names tokens.
        """
        import torch

        config = model.config
        if scale is None:
            scale = typical_scale(model, tokenizer, calibration)
        with torch.no_grad():
            head = (model.embed_tokens.weight if model.lm_head is None
                    else model.lm_head.weight).float().cpu().numpy()
            gain = model.norm.weight.float().cpu().numpy()
            rho = 1.0
            if config.hc_readout == "learned":
                rho = float(torch.sigmoid(model.readout.logits).sum())
            rows, projections = {}, {}
            d, cols = config.engram_head_dim, config.engram_columns
            for lid in config.engram_layer_ids:
                engram = model.engram(lid)
                rows[lid] = engram.embed.weight.float().cpu().numpy()
                w = engram.value_proj.weight.float().cpu().numpy()  # [hidden, cols * d]
                w = w.T.reshape(cols, d, -1)  # [cols, d, hidden]
                projections[lid] = (rho / scale) * w * gain
        hasher = model.hasher
        return cls(rows, hasher.offsets, hasher.primes, projections,
                   head - head.mean(0, keepdims=True), scale, config.engram_n_heads, tokenizer)

    def queries(self, layer_id: int, token_id: int) -> np.ndarray:
        """The query of every column of a layer for one token: ``[columns, head_dim]``."""
        return self.projections[layer_id] @ self.head[token_id]

    def top_rows(self, token_id: int, top_k: int = 10,
                 layers: Sequence[int] | None = None) -> list[tuple[float, int, int, int]]:
        """(score, layer id, column, slot) of the ``top_k`` rows that push hardest toward
        ``token_id`` over the given layers (default all), best first."""
        if top_k < 1:
            raise BadInputError(f"top_k must be at least 1, got {top_k}")
        if not 0 <= token_id < len(self.head):
            raise BadInputError(f"token id {token_id} is out of range (vocab {len(self.head)})")
        layer_ids = list(self.rows) if layers is None else list(layers)
        bad = [lid for lid in layer_ids if lid not in self.rows]
        if bad:
            raise BadInputError([f"layer {lid} is not an Engram layer (Engram layers: "
                                 f"{list(self.rows)})" for lid in bad])
        import faiss

        found = []
        threads = faiss.omp_get_max_threads()
        try:
            for lid in layer_ids:
                q = np.ascontiguousarray(self.queries(lid, token_id), np.float32)
                for c, index in enumerate(self.indexes[lid]):
                    # A small scan takes milliseconds: OpenMP threads would only add
                    # synchronisation, and spin for long when other processes hold the cores.
                    small = index.ntotal * index.d <= SERIAL_SCAN
                    faiss.omp_set_num_threads(1 if small else threads)
                    scores, slots = index.search(q[c:c + 1], min(top_k, index.ntotal))
                    found += [(float(s), lid, c, int(i))
                              for s, i in zip(scores[0], slots[0], strict=True) if i >= 0]
        finally:
            faiss.omp_set_num_threads(threads)
        found.sort(key=lambda f: -f[0])
        return found[:top_k]

    def search(self, token_id: int, top_k: int = 10,
               layers: Sequence[int] | None = None) -> list[RowHit]:
        """``top_rows`` as hits, each with the tokens the row pushes most."""
        return [self._hit(lid, c, slot, score)
                for score, lid, c, slot in self.top_rows(token_id, top_k, layers)]

    def row_scores(self, layer_id: int, token_id: int, rows: Sequence[int]) -> np.ndarray:
        """The score (push toward ``token_id``) of given global rows of a layer: ``[len(rows)]``."""
        rows = np.asarray(rows, np.int64)
        columns = np.searchsorted(self.offsets[layer_id], rows, side="right") - 1
        q = self.queries(layer_id, token_id)  # [columns, head_dim]
        return np.einsum("nd,nd->n", self.rows[layer_id][rows], q[columns])

    def push(self, layer_id: int, row: int, column: int) -> np.ndarray:
        """The centered logit push of one row: ``[vocab]``."""
        return self.head @ (self.rows[layer_id][row] @ self.projections[layer_id][column])

    def _hit(self, layer_id: int, column: int, slot: int, score: float) -> RowHit:
        row = int(self.offsets[layer_id][column]) + slot
        push = self.push(layer_id, row, column)
        top = np.argsort(-push)[:5].tolist()
        tok = self.tokenizer
        named = [TokenPush(t, tok.token_text(t) if tok and t < tok.vocab_size else "",
                           float(push[t])) for t in top]
        return RowHit(layer_id, row, column, column // self.n_heads + 2, column % self.n_heads,
                      slot, score, named)


def _faiss_gpus(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def typical_scale(model: EngramModel, tokenizer: EngramTokenizer | None,
                  calibration: Sequence[str] | None = None, max_texts: int = 8) -> float:
    """The median RMS of the final norm's input over the positions of calibration text.

    Default text: the first ``max_texts`` documents of the bundled held-out file. Returns 1.0
    when there is no tokenizer or no text.
    """
    import torch

    from engram_edit.paths import bundled_heldout_file

    if tokenizer is None:
        return 1.0
    if calibration is None:
        path = bundled_heldout_file()
        calibration = []
        if path.is_file():
            for text, _ in read_documents(path, hashlib.sha256()):
                calibration.append(text)
                if len(calibration) == max_texts:
                    break
    seen: list[torch.Tensor] = []
    hook = model.norm.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().float().pow(2).mean(-1).sqrt()))
    device = model.embed_tokens.weight.device
    try:
        with torch.no_grad():
            for text in calibration[:max_texts]:
                ids = tokenizer.encode(text)[: model.config.max_position_embeddings]
                if ids:
                    model(torch.tensor([ids], device=device))
    finally:
        hook.remove()
    if not seen:
        return 1.0
    return float(torch.cat([s.reshape(-1).cpu() for s in seen]).median())


def search_rows(files: ModelFiles, model: EngramModel, query: str, top_k: int = 10,
                layers: Sequence[int] | None = None, index: NgramIndex | None = None,
                searcher: RowSearch | None = None, sharers: int = 3) -> SearchResult:
    """Which rows (and, with an index, which n-grams) push the model hardest toward a token.

    Args:
        files (`ModelFiles`): the model directory ``model`` was built from.
        model (`EngramModel`): the built model.
        query (`str`): a text (its first token is searched) or an exact vocab entry.
        top_k (`int`, defaults to 10): rows returned.
        layers (`Sequence[int] | None`): Engram layers to search; all when None.
        index (`NgramIndex | None`): adds the n-grams that read each row and its load.
        searcher (`RowSearch | None`): a ``RowSearch.build(model)`` to reuse.
        sharers (`int`, defaults to 3): n-grams listed per row.

    Returns:
        `SearchResult`

    Raises:
        BadInputError: an empty query, a layer without Engram, ``top_k`` below 1.

    Example:
        >>> files, model = load_model("my-model")  # doctest: +SKIP
        >>> search_rows(files, model, " Empire").hits[0].sharers  # doctest: +SKIP
    """
    tokenizer = files.tokenizer
    token_id, ids = resolve_token(tokenizer, query)
    searcher = searcher or RowSearch.build(model, tokenizer=tokenizer)
    result = SearchResult(query, token_id, tokenizer.token_text(token_id),
                          [tokenizer.token_text(i) for i in ids], searcher.scale,
                          searcher.search(token_id, top_k, layers))
    if index is not None:
        for hit in result.hits:
            hit.sharers = index.sharers(hit.layer_id, hit.row, top_k=sharers)
            hit.load = index.slot_load(hit.layer_id, hit.row)
        result.ngrams = _pushing_ngrams(index, searcher, model, token_id, top_k, layers)
    return result


def _pushing_ngrams(index: NgramIndex, searcher: RowSearch, model: EngramModel,
                    token_id: int, top_k: int, layers: Sequence[int] | None) -> list[NgramHit]:
    """The indexed n-grams through which the memory raises a token's probability most.

    Every indexed n-gram is scored by the lens: the sum of its heads' row scores, per layer.
    The ``NGRAM_POOL`` best are then read by the model, each alone (its most common spelling,
    nothing before it), with the memory on and off; they are ranked by how much the memory
    raises the token's probability. The lens alone also ranks rows that push every token up a
    little; the model run keeps the n-grams whose rows, gated and carried through the later
    blocks, really move the prediction.
    """
    h = index.hasher
    best: dict[tuple[int, ...], tuple[float, int]] = {}  # ids -> (push, layer)
    for lid in searcher.rows if layers is None else layers:
        q = searcher.queries(lid, token_id)
        table, offsets = searcher.rows[lid], searcher.offsets[lid]
        for order in index.info.orders:
            if order > h.max_ngram:
                continue
            slots = index.order_slots(lid, order)
            push = np.zeros(len(slots))
            for j in range(h.n_heads):
                c = h.column(order, j)
                scores = table[offsets[c]:offsets[c] + h.primes[lid][c]] @ q[c]
                push += scores[slots[:, j]]
            for i in np.argsort(-push)[:NGRAM_POOL].tolist():
                ids = tuple(np.asarray(index.grams[order][i]).tolist())
                if push[i] > best.get(ids, (-np.inf, lid))[0]:
                    best[ids] = (float(push[i]), lid)
    pool = sorted(best, key=lambda g: -best[g][0])[:NGRAM_POOL]
    probs = _memory_effect(model, [index.spelling[list(g)].tolist() for g in pool], token_id)
    hits = []
    for ids, (on, off) in zip(pool, probs, strict=True):
        push, lid = best[ids]
        hits.append(NgramHit(lid, index.ngram_text(ids), list(ids), index.ngram_count(ids),
                             push, index.rows_of(lid, ids), on, on - off))
    hits.sort(key=lambda x: -x.effect)
    return hits[:top_k]


def _memory_effect(model: EngramModel, texts: list[list[int]],
                   token_id: int) -> list[tuple[float, float]]:
    """(memory on, memory off) probability of ``token_id`` after each token sequence."""
    import torch

    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(texts)
    device = model.embed_tokens.weight.device
    with torch.no_grad():
        for n in sorted({len(t) for t in texts}):
            at = [i for i, t in enumerate(texts) if len(t) == n]
            ids = torch.tensor([texts[i] for i in at], device=device)
            on, off = (torch.softmax(model(ids, memory=m).logits[:, -1].float(), -1)[:, token_id]
                       .tolist() for m in (True, False))
            for i, a, b in zip(at, on, off, strict=True):
                out[i] = (a, b)
    return out
