"""Measurements on a model: teacher-forced scores of completions, and memory ablation.

Every metric is defined once, in the docstring of the function that computes it, with the
JSON key it is reported under. ``METRICS_VERSION`` changes whenever a definition does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from engram_edit.edit.facts import scored_target
from engram_edit.errors import BadInputError
from engram_edit.model import EngramModel
from engram_edit.tokenizer import EngramTokenizer

if TYPE_CHECKING:
    from engram_edit.edit.facts import Fact

METRICS_VERSION = 2


@dataclass
class CompletionScores:
    logprob: np.ndarray  # [n] sum of the target tokens' log-probs, teacher forced
    greedy: np.ndarray  # [n] bool: greedy decoding would produce every target token
    tokens: np.ndarray  # [n] target length in tokens


@torch.no_grad()
def score_completions(model: EngramModel, tokenizer: EngramTokenizer, prompts: Sequence[str],
                      targets: Sequence[str], memory: bool = True,
                      batch_size: int = 64) -> CompletionScores:
    """Teacher-forced log P(target | prompt) and whether greedy decoding yields the target.

    Targets are taken as given (use ``scored_target`` first for a fact's answer). Sequences are
    right-padded, which a causal model never sees.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = next(model.parameters()).device
    pairs = []
    for p, t in zip(prompts, targets, strict=True):
        pi, ti = tokenizer.encode(p), tokenizer.encode(t)
        if not pi or not ti:
            raise BadInputError(f"empty prompt or target: {p!r} -> {t!r}")
        pairs.append((pi, ti))
    logprob = np.zeros(len(pairs))
    greedy = np.zeros(len(pairs), dtype=bool)
    window = model.config.max_position_embeddings
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [(pi + ti)[-window:] for pi, ti in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        logp = F.log_softmax(model(ids.to(device), memory=memory).logits.float(), -1).cpu()
        for i, ((_, ti), s) in enumerate(zip(chunk, seqs, strict=True)):
            n = len(ti)
            pos = torch.arange(len(s) - n - 1, len(s) - 1)  # positions that predict the target
            target = torch.tensor(ti)
            logprob[start + i] = float(logp[i, pos, target].sum())
            greedy[start + i] = bool((logp[i, pos].argmax(-1) == target).all())
    return CompletionScores(logprob, greedy, np.array([len(t) for _, t in pairs]))


@dataclass
class AblationRow:
    name: str  # "facts", "text", or a probe group: "capital (heldout)"
    items: int
    top1_memory: float
    top1_no_memory: float
    loss_memory: float
    loss_no_memory: float

    @property
    def kept(self) -> float | None:
        """Share of top-1 accuracy kept when the memory is off (None when top-1 is 0)."""
        return self.top1_no_memory / self.top1_memory if self.top1_memory else None


@dataclass(frozen=True)
class Probe:
    """A factual completion: ``target`` (with its leading space) should follow ``prompt``."""

    prompt: str
    target: str
    relation: str = "entity"  # what it asks ("capital"); entity-name completions are "entity"
    phrasing: str = "trained"  # "heldout": a wording the training text never uses
    count: int | None = None  # occurrences in the training corpus, where mined from it


def read_probes(path: str | Path, min_count: int | None = None) -> list[Probe]:
    """The probes of a JSONL file ("prompt" and "target"; optional "relation", "phrasing" and
    "count"); with ``min_count``, only the entity probes whose "count" (corpus occurrences)
    is at least that.

    Raises:
        BadInputError: unreadable file, a line that is not such an object, a line without an
            integer "count" on an entity probe when ``min_count`` is given, or no probes left.
    """
    path = Path(path)
    probes, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: cannot read ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            probe = Probe(str(rec["prompt"]), str(rec["target"]),
                          str(rec.get("relation", "entity")), str(rec.get("phrasing", "trained")),
                          rec.get("count"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            problems.append(f"{path}:{n}: not a JSON object with 'prompt' and 'target'")
            continue
        if probe.phrasing not in ("trained", "heldout"):
            problems.append(f"{path}:{n}: phrasing: must be 'trained' or 'heldout'")
            continue
        if min_count is not None:
            if probe.relation != "entity":
                continue  # corpus counts are of entity names; fact probes have none
            count = probe.count
            if not isinstance(count, int) or isinstance(count, bool):
                problems.append(f"{path}:{n}: count: missing or not an integer (--min-count "
                                f"needs the corpus count of every probe)")
                continue
            if count < min_count:
                continue
        probes.append(probe)
    if problems:
        raise BadInputError(problems)
    if not probes:
        raise BadInputError(f"{path}: no probes" + (f" with count >= {min_count}"
                                                    if min_count is not None else ""))
    return probes


def _ablation_row(name: str, on: CompletionScores, off: CompletionScores,
                  keep: np.ndarray) -> AblationRow:
    n_tokens = on.tokens[keep].sum()
    return AblationRow(name, int(keep.sum()), float(on.greedy[keep].mean()),
                       float(off.greedy[keep].mean()),
                       float(-on.logprob[keep].sum() / n_tokens),
                       float(-off.logprob[keep].sum() / n_tokens))


def relation_group(probe: Probe) -> str:
    """The group a probe is reported in by relation and phrasing: "capital (heldout)"."""
    return f"{probe.relation} ({probe.phrasing})"


def fact_ablation(model: EngramModel, tokenizer: EngramTokenizer, probes: Sequence[Probe],
                  group_by: Sequence[Callable[[Probe], str]] = ()) -> list[AblationRow]:
    """Key "facts": top-1 = share of prompts whose greedy continuation is the whole target;
    loss = mean per-token negative log-likelihood of the targets; memory on and off. The
    probes are scored once; after the row of all of them comes, for each function of
    ``group_by``, one row per group it names (e.g. ``relation_group``), in the order the
    probes first name them."""
    prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
    on = score_completions(model, tokenizer, prompts, targets, memory=True)
    off = score_completions(model, tokenizer, prompts, targets, memory=False)
    rows = [_ablation_row("facts", on, off, np.ones(len(probes), dtype=bool))]
    for group in group_by:
        names = np.array([group(p) for p in probes])
        for name in dict.fromkeys(names):
            rows.append(_ablation_row(str(name), on, off, names == name))
    return rows


@torch.no_grad()
def text_ablation(model: EngramModel, stream: np.ndarray, windows: int = 32,
                  seq_len: int = 256) -> AblationRow:
    """Key "text": next-token top-1 accuracy and mean loss over ``windows`` evenly spaced
    windows of held-out text, memory on and off."""
    device = next(model.parameters()).device
    usable = len(stream) - seq_len - 1
    if usable <= 0:
        raise BadInputError(f"held-out text has {len(stream)} tokens, fewer than one window")
    starts = np.linspace(0, usable, num=windows, dtype=np.int64)
    batch = torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len + 1], dtype=np.int64)
                                       for s in starts])).to(device)
    out = {}
    for memory in (True, False):
        top1 = loss = 0.0
        for chunk in batch.split(8):
            logits = model(chunk[:, :-1], memory=memory).logits.float()
            target = chunk[:, 1:]
            loss += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            top1 += (logits.argmax(-1) == target).sum().item()
        out[memory] = (top1 / (len(starts) * seq_len), loss / (len(starts) * seq_len))
    return AblationRow("text", windows * seq_len, out[True][0], out[False][0], out[True][1],
                       out[False][1])


# --- edit metrics -------------------------------------------------------------------

@dataclass
class FactMetrics:
    """The metric set of an edit, for one model state; docs/metrics.md gives every formula.
    Each field is reported under its own name as the JSON key; a metric with nothing to
    measure (no rephrase, locality or portability prompts, no ground truth, no held-out text)
    is None (JSON null). Answers are joined to prompts as ``scored_target`` says and scored
    teacher forced. Locality prompts that are themselves prompts of the facts measured are
    not neighbours (their answers change on purpose) and are left out.

    What the user sees (greedy decoding, as ``generate`` prints it):
    - ``says``: share of facts whose greedy continuation starts with target_new.
    - ``paraphrase_says``: the same on every rephrase prompt.
    EasyEdit (token top-1 accuracy, teacher forced):
    - ``reliability``: per fact, the share of target_new's tokens that are the argmax; mean.
    - ``generalization``: the same on the rephrase prompts.
    - ``locality``: per locality prompt, the share of positions of its answer (teacher forced)
      where the argmax token equals the unedited model's; mean.
    - ``portability``: token top-1 accuracy of each portability answer after its prompt.
    CounterFact (probabilities of whole answers, P = exp(mean log-prob per token)):
    - ``efficacy``: share of facts with P(target_new) > P(ground_truth); a fact without a
      ground truth counts when it ``says`` the target. ``efficacy_magnitude``: mean
      P(target_new) - P(ground_truth) over facts with a ground truth.
    - ``paraphrase``, ``paraphrase_magnitude``: the same on the rephrase prompts.
    - ``neighbourhood``: share of locality prompts with P(locality answer) > P(target_new of
      their fact). ``neighbourhood_magnitude``: mean P(locality answer) - P(target_new).
    Beside them:
    - ``neighbourhood_unchanged``: share of locality prompts whose greedy continuation, as many
      tokens as the locality answer, equals the unedited model's.
    - ``neighbourhood_kl``: mean KL(unedited || model), in nats, of the next-token
      distribution after each locality prompt.
    - ``heldout_loss``: mean next-token cross-entropy, nats per token, on held-out windows.
    """

    says: float
    paraphrase_says: float | None
    reliability: float
    generalization: float | None
    locality: float | None
    portability: float | None
    efficacy: float
    efficacy_magnitude: float | None
    paraphrase: float | None
    paraphrase_magnitude: float | None
    neighbourhood: float | None
    neighbourhood_magnitude: float | None
    neighbourhood_unchanged: float | None
    neighbourhood_kl: float | None
    heldout_loss: float | None


@dataclass
class NeighbourReference:
    """What the reference (unedited) model does after every locality prompt, in fact order."""

    greedy: list[list[int]]  # greedy continuation, as many tokens as the locality answer
    log_probs: torch.Tensor  # [N, vocab] next-token log-probs after each prompt (CPU)
    answer_top1: list[list[int]]  # argmax at each locality-answer position, teacher forced


@dataclass
class _Scores:
    logprob: np.ndarray  # [n] sum of the target tokens' log-probs
    greedy: np.ndarray  # [n] bool: every target token is the argmax
    hits: np.ndarray  # [n] share of the target tokens that are the argmax
    top1: list[list[int]]  # [n][target length] the argmax at each target position
    first: torch.Tensor | None  # [n, vocab] log-probs at the first target position
    lead: np.ndarray  # [n] least log-prob margin of a target token over the best other token


@torch.no_grad()
def _teacher_forced(model: EngramModel, prompts: list[list[int]], targets: list[list[int]],
                    memory: bool, keep_first: bool = False, batch_size: int = 64) -> _Scores:
    """Scores of token-id targets after token-id prompts (right-padded batches)."""
    device = next(model.parameters()).device
    window = model.config.max_position_embeddings
    logprob = np.zeros(len(prompts))
    greedy = np.zeros(len(prompts), dtype=bool)
    hits = np.zeros(len(prompts))
    lead = np.zeros(len(prompts))
    top1: list[list[int]] = []
    first = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[start:start + batch_size], targets[start:start + batch_size],
                         strict=True))
        seqs = [(p + t)[-window:] for p, t in chunk]
        ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        logits = model(ids.to(device), memory=memory).logits.float()
        logp = F.log_softmax(logits, -1).cpu()
        for i, ((_, t), s) in enumerate(zip(chunk, seqs, strict=True)):
            pos = torch.arange(len(s) - len(t) - 1, len(s) - 1)
            tgt = torch.tensor(t)
            best = logp[i, pos].argmax(-1)
            logprob[start + i] = float(logp[i, pos, tgt].sum())
            greedy[start + i] = bool((best == tgt).all())
            hits[start + i] = float((best == tgt).float().mean())
            other = logp[i, pos].scatter(1, tgt[:, None], float("-inf")).amax(-1)
            lead[start + i] = float((logp[i, pos, tgt] - other).min())
            top1.append(best.tolist())
            if keep_first:
                first.append(logp[i, pos[0]].clone())
    return _Scores(logprob, greedy, hits, top1,
                   torch.stack(first) if keep_first and first else None, lead)


@torch.no_grad()
def _greedy(model: EngramModel, prompts: list[list[int]], lengths: list[int], memory: bool,
            batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt, ``lengths[i]`` tokens."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max(lengths, default=0)):
        todo = [i for i, k in enumerate(lengths) if k > step]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            seqs = [prompts[i] + out[i] for i in chunk]
            ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.tensor(s)
            logits = model(ids.to(device), memory=memory).logits
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            nxt = logits[torch.arange(len(seqs), device=device), last].argmax(-1).tolist()
            for i, token in zip(chunk, nxt, strict=True):
                out[i].append(int(token))
    return out


def _encode(tokenizer: EngramTokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    p, a = tokenizer.encode(prompt), tokenizer.encode(scored_target(prompt, answer))
    if not p or not a:
        raise BadInputError(f"empty prompt or answer: {prompt!r} -> {answer!r}")
    return p, a


def _neighbours(tokenizer: EngramTokenizer, facts: Sequence[Fact]
                ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Per locality prompt: its ids, its answer's ids, and its fact's target_new's ids.
    A locality prompt that is itself the prompt of one of ``facts`` is left out: its answer
    is changed on purpose."""
    edited = {f.prompt for f in facts}
    prompts, answers, news = [], [], []
    for f in facts:
        for p, a in zip(f.locality_prompts, f.locality_answers, strict=True):
            if p in edited:
                continue
            ids, ans = _encode(tokenizer, p, a)
            prompts.append(ids)
            answers.append(ans)
            news.append(_encode(tokenizer, p, f.target_new)[1])
    return prompts, answers, news


def neighbour_reference(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact],
                        memory: bool = True) -> NeighbourReference:
    """The reference for ``locality``, ``neighbourhood_unchanged`` and ``neighbourhood_kl``:
    run it on the model before editing."""
    prompts, answers, _ = _neighbours(tokenizer, facts)
    if not prompts:
        return NeighbourReference([], torch.zeros(0, model.config.vocab_size), [])
    greedy = _greedy(model, prompts, [len(a) for a in answers], memory)
    first = _teacher_forced(model, prompts, greedy, memory, keep_first=True).first
    assert first is not None
    return NeighbourReference(greedy, first,
                              _teacher_forced(model, prompts, answers, memory).top1)


def heldout_windows(stream: np.ndarray, windows: int = 32, seq_len: int = 128) -> np.ndarray:
    """``windows`` evenly spaced windows of ``seq_len + 1`` tokens of a held-out stream,
    int64 ``[windows, seq_len + 1]``; fewer when the stream is short, none when shorter than
    one window."""
    usable = len(stream) - seq_len - 1
    if usable < 0 or windows < 1:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    starts = np.unique(np.linspace(0, usable, num=windows, dtype=np.int64))
    return np.stack([np.asarray(stream[s:s + seq_len + 1], dtype=np.int64) for s in starts])


@torch.no_grad()
def heldout_loss(model: EngramModel, windows: np.ndarray, memory: bool = True) -> float | None:
    """Key "heldout_loss": mean next-token cross-entropy (nats/token) over ``windows``
    (from ``heldout_windows``); None without windows."""
    if len(windows) == 0:
        return None
    device = next(model.parameters()).device
    batch = torch.from_numpy(np.asarray(windows, dtype=np.int64)).to(device)
    total = 0.0
    for chunk in batch.split(16):
        logits = model(chunk[:, :-1], memory=memory).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                 reduction="sum").item()
    return total / (batch.shape[0] * (batch.shape[1] - 1))


def _probability(logprob: np.ndarray, tokens: list[list[int]]) -> np.ndarray:
    """P of each answer as CounterFact scores it: exp(mean log-prob per token)."""
    return np.exp(logprob / np.array([len(t) for t in tokens], dtype=np.float64))


@dataclass
class _Contest:
    says: np.ndarray  # [n] bool
    hits: np.ndarray  # [n] token top-1 accuracy of target_new
    wins: np.ndarray  # [n] bool: the efficacy criterion
    lead: np.ndarray  # [k] P(new) - P(truth), for the prompts with a truth


def _contest(model: EngramModel, prompts: list[list[int]], news: list[list[int]],
             truths: list[list[int] | None], memory: bool) -> _Contest:
    """target_new against the ground truth after each prompt."""
    new = _teacher_forced(model, prompts, news, memory)
    has = [i for i, t in enumerate(truths) if t is not None]
    wins = new.greedy.copy()
    lead = np.zeros(0)
    if has:
        old_tokens = [truths[i] for i in has]
        old = _teacher_forced(model, [prompts[i] for i in has], old_tokens, memory)
        p_new = _probability(new.logprob[has], [news[i] for i in has])
        p_old = _probability(old.logprob, old_tokens)
        wins[has] = p_new > p_old
        lead = p_new - p_old
    return _Contest(new.greedy, new.hits, wins, lead)


def _share(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def _portability(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact],
                 memory: bool) -> float | None:
    pairs = [_encode(tokenizer, p, a) for f in facts
             for p, a in zip(f.portability_prompts, f.portability_answers, strict=True)]
    if not pairs:
        return None
    return _share(_teacher_forced(model, [p for p, _ in pairs], [a for _, a in pairs],
                                  memory).hits)


def fact_metrics(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact],
                 reference: NeighbourReference | None = None,
                 heldout: np.ndarray | None = None, memory: bool = True) -> FactMetrics:
    """Every metric of ``FactMetrics`` for the model as it is now.

    Args:
        model (`EngramModel`): the model to measure.
        tokenizer (`EngramTokenizer`): its tokenizer.
        facts (`Sequence[Fact]`): the facts (edit/facts.py).
        reference (`NeighbourReference`, optional): the unedited model's behaviour on the
            locality prompts; the model itself (as now) when None.
        heldout (`np.ndarray`, optional): held-out windows (``heldout_windows``).
        memory (`bool`, defaults to True): False measures with every Engram module off.

    Returns:
        `FactMetrics`
    """
    if not facts:
        raise BadInputError("no facts to measure")

    def contest(pairs: list[tuple[str, Fact]]) -> _Contest:
        prompts, news, truths = [], [], []
        for prompt, f in pairs:
            ids, new = _encode(tokenizer, prompt, f.target_new)
            prompts.append(ids)
            news.append(new)
            truths.append(None if f.ground_truth is None
                          else _encode(tokenizer, prompt, f.ground_truth)[1])
        return _contest(model, prompts, news, truths, memory)

    main = contest([(f.prompt, f) for f in facts])
    rephrased = [(r, f) for f in facts for r in f.rephrase_prompts]
    para = contest(rephrased) if rephrased else None
    loc_prompts, answers, loc_news = _neighbours(tokenizer, facts)
    if reference is None:
        reference = neighbour_reference(model, tokenizer, facts, memory)
    locality = hood = hood_lead = unchanged = kl = None
    if loc_prompts:
        ans = _teacher_forced(model, loc_prompts, answers, memory)
        new = _teacher_forced(model, loc_prompts, loc_news, memory)
        same = _teacher_forced(model, loc_prompts, reference.greedy, memory, keep_first=True)
        assert same.first is not None
        locality = _share(np.array([np.mean(np.array(a) == np.array(b)) for a, b in
                                    zip(ans.top1, reference.answer_top1, strict=True)]))
        p_ans, p_new = _probability(ans.logprob, answers), _probability(new.logprob, loc_news)
        hood, hood_lead = _share(p_ans > p_new), _share(p_ans - p_new)
        unchanged = _share(same.greedy)
        ref = reference.log_probs
        kl = float((ref.exp() * (ref - same.first)).sum(-1).mean())
    return FactMetrics(
        says=float(main.says.mean()), paraphrase_says=para and _share(para.says),
        reliability=float(main.hits.mean()), generalization=para and _share(para.hits),
        locality=locality, portability=_portability(model, tokenizer, facts, memory),
        efficacy=float(main.wins.mean()), efficacy_magnitude=_share(main.lead),
        paraphrase=para and _share(para.wins), paraphrase_magnitude=para and _share(para.lead),
        neighbourhood=hood, neighbourhood_magnitude=hood_lead,
        neighbourhood_unchanged=unchanged, neighbourhood_kl=kl,
        heldout_loss=None if heldout is None else heldout_loss(model, heldout, memory))


def _target_scores(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact],
                   memory: bool) -> _Scores:
    """target_new after each fact's prompt, teacher forced."""
    pairs = [_encode(tokenizer, f.prompt, f.target_new) for f in facts]
    return _teacher_forced(model, [p for p, _ in pairs], [a for _, a in pairs], memory)


def target_leads(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact],
                 memory: bool = True) -> np.ndarray:
    """Per fact, the least margin in nats by which a token of target_new is the top-1 after its
    prompt, teacher forced (``[n]``; negative where another token wins somewhere): the fact is
    said when it is positive."""
    return _target_scores(model, tokenizer, facts, memory).lead


def greedy_hits(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact],
                memory: bool = True) -> np.ndarray:
    """Per fact, whether its greedy continuation is target_new (bool ``[n]``); the mean is
    ``says``. Used to keep the true facts a model knows, and to check they stay."""
    return _target_scores(model, tokenizer, facts, memory).greedy
