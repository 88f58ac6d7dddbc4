"""Training loop for small Engram models (the bundled model is trained with it).

Owns batching a tokenized corpus, the two optimizer groups (backbone vs Engram tables), the
learning-rate schedule, validation with memory on and off, atomic checkpoints and resume.
It reports progress through a callback and never prints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engram_edit.checkpoint import load_model, model_compression, save_model
from engram_edit.config import EngramConfig
from engram_edit.corpus import read_texts
from engram_edit.errors import BadInputError
from engram_edit.fileio import atomic_path, atomic_write_text
from engram_edit.model import EngramModel, pick_device
from engram_edit.paths import cache_dir
from engram_edit.tokenizer import EngramTokenizer

STATE_DIR = ".train"  # inside the output dir: resumable state, removed when training ends


@dataclass
class TrainSettings:
    tokens: int | None = None  # stop after this many training tokens
    minutes: float | None = None  # or after this much wall time
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3  # backbone peak learning rate (AdamW)
    table_lr: float = 2e-2  # Engram tables: large, and each row sees few updates
    weight_decay: float = 0.1  # backbone matrices only
    table_weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to this share of the peak
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between validation runs
    eval_batches: int = 8  # validation batches (fixed windows) per run
    checkpoint_seconds: float = 300.0  # wall time between resumable checkpoints
    seed: int = 0
    device: str | None = None
    bf16: bool = True  # bf16 autocast (CPU with AMX, or CUDA)
    threads: int | None = None  # torch CPU threads; default: torch's choice
    compile: bool = False  # torch.compile the training forward (~2 min to compile, faster steps)
    # Share of steps run with every Engram module off, so the backbone stays usable without the
    # memory and an ablation measures what lives in the tables rather than broken co-adaptation.
    memory_dropout: float = 0.0
    out_dtype: str = "float32"  # storage dtype of the final model.safetensors
    init: str | None = None  # a model directory whose weights start the run (same geometry)

    def problems(self) -> list[str]:
        p = []
        if (self.tokens is None) == (self.minutes is None):
            p.append("give exactly one of --tokens or --minutes")
        if self.tokens is not None and self.tokens <= 0:
            p.append(f"--tokens: must be positive, got {self.tokens}")
        if self.minutes is not None and self.minutes <= 0:
            p.append(f"--minutes: must be positive, got {self.minutes}")
        for name in ("batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1")
        if self.warmup_steps < 0:
            p.append(f"--warmup-steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.memory_dropout < 1.0:
            p.append(f"--memory-dropout: must be in [0, 1), got {self.memory_dropout}")
        return p


@dataclass
class TrainProgress:
    step: int
    tokens: int
    loss: float
    tokens_per_s: float
    elapsed_s: float
    fraction: float  # of the token or time budget, 0..1
    lr: float
    valid_loss: float | None = None  # memory on
    valid_loss_no_memory: float | None = None
    event: str = "step"  # "step", "eval", "checkpoint"


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    valid_loss: float
    valid_loss_no_memory: float
    history: list[dict] = field(default_factory=list)


def tokenize_corpus(corpus: Path, tokenizer: EngramTokenizer, split: str) -> np.ndarray:
    """One token stream of a corpus split (see ``tokenize_texts``)."""
    path = Path(corpus) / f"{split}.jsonl"
    if not path.is_file():
        raise BadInputError(f"{path}: missing (build the corpus with `engram-edit corpus`)")
    return tokenize_texts(path, tokenizer)


def tokenize_texts(path: Path, tokenizer: EngramTokenizer) -> np.ndarray:
    """One uint16/int32 stream of a JSONL file's documents, each followed by <eos>; cached in
    the user cache directory under the file's and the tokenizer's sha256."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: file not found")
    key = hashlib.sha256(path.read_bytes() + tokenizer.sha256.encode()).hexdigest()[:24]
    cached = cache_dir() / "tokens" / f"{key}.npy"
    if cached.is_file():
        return np.load(cached, mmap_mode="r")
    eos = tokenizer.token_id("<eos>")
    if eos is None:
        raise BadInputError("tokenizer.json: no <eos> token to separate documents")
    texts = list(read_texts(path))
    pieces = []
    for enc in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
    stream = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
    with atomic_path(cached) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, stream)
    return stream


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(stream[idx], dtype=np.int64))


def _batch(stream: np.ndarray, step: int, s: TrainSettings) -> tuple[torch.Tensor, bool]:
    """Random windows and whether the memory is on, a pure function of (seed, step) so that
    resume sees the same data."""
    rng = np.random.default_rng([s.seed, step])
    starts = rng.integers(0, len(stream) - s.seq_len - 1, size=s.batch_size)
    memory = bool(rng.random() >= s.memory_dropout)
    return _windows(stream, starts, s.seq_len), memory


def _valid_batches(stream: np.ndarray, s: TrainSettings) -> list[torch.Tensor]:
    n = s.batch_size * s.eval_batches
    usable = len(stream) - s.seq_len - 1
    starts = np.linspace(0, usable, num=n, dtype=np.int64)
    return [_windows(stream, starts[i:i + s.batch_size], s.seq_len)
            for i in range(0, n, s.batch_size)]


def _optimizer(model: EngramModel, s: TrainSettings) -> torch.optim.Optimizer:
    tables, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if ".engram.embed." in name:
            tables.append(p)
        elif p.ndim >= 2 and "embed_tokens" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": s.lr, "weight_decay": s.weight_decay, "peak": s.lr},
        {"params": no_decay, "lr": s.lr, "weight_decay": 0.0, "peak": s.lr},
        {"params": tables, "lr": s.table_lr, "weight_decay": s.table_weight_decay,
         "peak": s.table_lr},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)


def _lr_scale(step: int, fraction: float, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * cos


def _loss(model: torch.nn.Module, batch: torch.Tensor, memory: bool, s: TrainSettings,
          device: torch.device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        logits = model(batch[:, :-1], memory=memory).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: EngramModel, batches: list[torch.Tensor], s: TrainSettings,
             device: torch.device) -> tuple[float, float]:
    """Mean validation loss with memory on, and with every Engram module off."""
    model.eval()
    on = sum(_loss(model, b, True, s, device).item() for b in batches) / len(batches)
    off = sum(_loss(model, b, False, s, device).item() for b in batches) / len(batches)
    model.train()
    return on, off


def _load_init(model: EngramModel, path: Path, tokenizer: EngramTokenizer) -> None:
    """Start from the weights of the model in ``path``, which must have this geometry and
    tokenizer (continued training, e.g. on a new data mix)."""
    files, init = load_model(path, device="cpu")
    ours, theirs = model.state_dict(), init.state_dict()
    problems = [f"--init {path}: {k} has shape {tuple(theirs[k].shape) if k in theirs else None}"
                f", the run's model {tuple(v.shape)}" for k, v in ours.items()
                if k not in theirs or theirs[k].shape != v.shape]
    problems += [f"--init {path}: {k} is not in the run's model" for k in theirs if k not in ours]
    if files.tokenizer.sha256 != tokenizer.sha256:
        problems.append(f"--init {path}: its tokenizer.json differs from the run's")
    if problems:
        raise BadInputError(problems)
    model.load_state_dict({k: v.float() for k, v in theirs.items()})


def _save_state(out: Path, model: EngramModel, opt: torch.optim.Optimizer, meta: dict) -> None:
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(state_dir / "state.pt") as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
    atomic_write_text(state_dir / "meta.json", json.dumps(meta, indent=1))


def train(corpus: Path, out: Path, config: EngramConfig, tokenizer: EngramTokenizer,
          settings: TrainSettings, resume: bool = False,
          on_progress: Callable[[TrainProgress], None] | None = None) -> TrainResult:
    """Train a model on ``corpus`` and write it to ``out`` (config, tokenizer, weights)."""
    problems = settings.problems()
    if problems:
        raise BadInputError(problems)
    out = Path(out)
    state_dir = out / STATE_DIR
    if resume and not (state_dir / "meta.json").is_file():
        raise BadInputError(f"{out}: nothing to resume (no {STATE_DIR}/meta.json)")
    if not resume and out.exists() and any(out.iterdir()):
        raise BadInputError(f"{out}: already exists and is not empty (use --resume to go on, "
                            f"or choose another --out)")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    train_stream = tokenize_corpus(corpus, tokenizer, "train")
    valid_stream = tokenize_corpus(corpus, tokenizer, "valid")
    for split, stream in (("train", train_stream), ("valid", valid_stream)):
        if len(stream) <= settings.seq_len + 1:
            raise BadInputError(f"{corpus}: the {split} split has {len(stream)} tokens, fewer "
                                f"than one window of {settings.seq_len + 1}")
    valid = _valid_batches(valid_stream, settings)

    torch.manual_seed(settings.seed)
    model = EngramModel(config, model_compression(config, tokenizer)).to(device)
    if settings.init and not resume:
        _load_init(model, Path(settings.init), tokenizer)
    opt = _optimizer(model, settings)
    step, tokens, elapsed, history = 0, 0, 0.0, []
    if resume:
        meta = json.loads((state_dir / "meta.json").read_text())
        saved = torch.load(state_dir / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step, tokens, elapsed, history = (meta["step"], meta["tokens"], meta["elapsed_s"],
                                          meta["history"])
    model.train()
    # Only the training forward is compiled; evaluation (memory off too) stays eager.
    step_model = torch.compile(model) if settings.compile else model
    per_step = settings.batch_size * settings.seq_len
    budget_tokens = settings.tokens
    budget_s = settings.minutes * 60 if settings.minutes else None

    def fraction() -> float:
        return tokens / budget_tokens if budget_tokens else elapsed / budget_s

    start = time.perf_counter() - elapsed
    last_ckpt = time.perf_counter()
    loss_avg = None
    valid_on = valid_off = float("nan")
    while fraction() < 1.0:
        scale = _lr_scale(step, fraction(), settings)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * scale
        batch, memory = _batch(train_stream, step, settings)
        loss = _loss(step_model, batch, memory, settings, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        step += 1
        tokens += per_step
        elapsed = time.perf_counter() - start
        value = loss.item()
        if memory or loss_avg is None:  # the reported training loss is the memory-on loss
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        event = "step"
        if step % settings.eval_every == 0 or fraction() >= 1.0:
            valid_on, valid_off = evaluate(model, valid, settings, device)
            history.append({"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 1),
                            "train_loss": round(loss_avg, 4), "valid_loss": round(valid_on, 4),
                            "valid_loss_no_memory": round(valid_off, 4)})
            event = "eval"
        if on_progress:
            on_progress(TrainProgress(step, tokens, loss_avg, tokens / max(elapsed, 1e-9),
                                      elapsed, min(fraction(), 1.0), scale * settings.lr,
                                      valid_on, valid_off, event))
        if time.perf_counter() - last_ckpt > settings.checkpoint_seconds and fraction() < 1.0:
            _save_state(out, model, opt, {"step": step, "tokens": tokens, "elapsed_s": elapsed,
                                          "history": history, "settings": asdict(settings)})
            last_ckpt = time.perf_counter()
            if on_progress:
                on_progress(TrainProgress(step, tokens, loss_avg, tokens / max(elapsed, 1e-9),
                                          elapsed, fraction(), scale * settings.lr, valid_on,
                                          valid_off, "checkpoint"))
    model.eval()
    save_model(model, tokenizer, out, dtype=settings.out_dtype, overwrite=True)
    result = TrainResult(out, step, tokens, elapsed, float(loss_avg), valid_on, valid_off, history)
    record = {k: v for k, v in asdict(result).items() if k != "out"}
    record["settings"] = asdict(settings)
    atomic_write_text(out / "training.json", json.dumps(record, indent=1) + "\n")
    if state_dir.exists():
        for f in state_dir.iterdir():
            f.unlink()
        os.rmdir(state_dir)
    return result
