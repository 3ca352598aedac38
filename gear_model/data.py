"""Training triples (query, document, unit) from the dataset's train.parquet."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, DistributedSampler

from gear_model.losses import doc_keys

REQUIRED_COLUMNS = ("query", "document", "unit", "doc_id")


class TrainingDataError(ValueError):
    """The triples cannot train this run (a missing column, an empty value, no
    triple that fits): the same on every attempt, so the launcher does not retry."""

# Read when present: what the localisation loss (``GearConfig.loc_weight``) needs.
SENTENCE_COLUMNS = ("sentence_spans", "unit_index")


def train_parquet(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/train.parquet``."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no training triples at {path} (give train.parquet or its dataset folder)")
    return path


def unit_window(
    offsets: list[tuple[int, int]], unit_start: int, unit_end: int, budget: int, seed: int = 0
) -> tuple[int, int] | None:
    """Token range [a, b) of at most ``budget`` tokens that holds the unit's tokens.

    ``offsets`` are the document's token character spans (no special tokens).
    The whole document when it fits, or its first ``budget`` tokens when they
    hold the unit; else a window placed at a seeded random offset among those
    that hold the unit (a centred unit would teach the model where units
    sit), moved back to a word start (not inside a WordPiece run). None when
    the unit alone needs more than ``budget`` tokens.
    """
    n = len(offsets)
    if n <= budget:
        return 0, n
    inside = [i for i, (s, e) in enumerate(offsets) if e > unit_start and s < unit_end]
    if not inside:
        return None
    first, last = inside[0], inside[-1]
    if last < budget:
        return 0, budget
    width = last - first + 1
    if width > budget:
        return None
    lowest, highest = max(0, last - budget + 1), min(first, n - budget)
    a = lowest + int(hashlib.blake2b(f"{seed}:{unit_start}:{unit_end}".encode(), digest_size=8).hexdigest(), 16) % (
        highest - lowest + 1
    )
    def continues_a_word(i: int) -> bool:
        return i > 0 and offsets[i][0] == offsets[i - 1][1]

    while a > lowest and continues_a_word(a):
        a -= 1
    while a < first and continues_a_word(a):  # still inside a word at the lowest start: go forward
        a += 1
    return a, min(n, a + budget)


class TriplesDataset(Dataset):
    """Training triples. With a tokenizer, every row is checked against the
    training lengths so that the model always sees its target:

    - a document longer than ``max_doc_length`` is cut to a window that holds
      the unit (``windowed``), instead of being truncated at the end, which
      would cut away a unit that starts late;
    - a unit that cannot fit the document window, or whose tokens exceed
      ``max_unit_length`` (the decoder target), is dropped and counted.

    ``stats`` counts rows per outcome (``fits``, ``windowed``,
    ``dropped_unit_too_long_for_doc_window``, ``dropped_unit_longer_than_max_unit_length``).

    When the file has ``sentence_spans`` and ``unit_index`` (the triples
    schema), each row carries them too, moved with the document window
    (``has_sentences``).
    """

    def __init__(self, path: str | Path, tokenizer=None, max_doc_length: int = 512, max_unit_length: int = 512):
        self.path = train_parquet(path)
        table = pq.read_table(self.path)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise TrainingDataError(f"{self.path}: missing columns {missing} (has {table.column_names})")
        cols = {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS}
        for c, values in cols.items():
            bad = [i for i, v in enumerate(values) if not v]
            if bad:
                raise TrainingDataError(f"{self.path}: row {bad[0]} has an empty {c!r} ({len(bad)} such rows)")
        rows = list(zip(*(cols[c] for c in REQUIRED_COLUMNS), strict=True))
        self.has_sentences = all(c in table.column_names for c in SENTENCE_COLUMNS)
        if self.has_sentences:
            spans = [[(sp["start"], sp["end"]) for sp in row] for row in table.column("sentence_spans").to_pylist()]
            rows = [(*row, spans[i], index) for i, (row, index) in
                    enumerate(zip(rows, table.column("unit_index").to_pylist(), strict=True))]
        self.stats: dict[str, int] = {}
        if tokenizer is not None:
            spans = None
            if {"unit_start", "unit_end"} <= set(table.column_names):
                spans = list(zip(table.column("unit_start").to_pylist(), table.column("unit_end").to_pylist()))
            rows = self._fit_lengths(rows, spans, tokenizer, max_doc_length, max_unit_length)
        self.rows = rows

    def _fit_lengths(self, rows, spans, tokenizer, max_doc_length, max_unit_length):
        budget = max_doc_length - 2  # [CLS] and [SEP]
        kept = []
        counts = dict.fromkeys(
            ("fits", "windowed", "dropped_unit_too_long_for_doc_window", "dropped_unit_longer_than_max_unit_length"), 0
        )
        docs = sorted({r[1] for r in rows})
        doc_offsets = dict(zip(docs, tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]))
        unit_lengths = [len(ids) for ids in tokenizer([r[2] for r in rows], add_special_tokens=False)["input_ids"]]
        for i, row in enumerate(rows):
            query, document, unit, doc_id = row[:4]
            if unit_lengths[i] > max_unit_length - 2:
                counts["dropped_unit_longer_than_max_unit_length"] += 1
                continue
            if spans is not None:
                start, end = spans[i]
            else:
                start = document.find(unit)
                end = start + len(unit) if start >= 0 else 0
            if start < 0 or document[start:end] != unit:
                raise TrainingDataError(f"{self.path}: row {i}: the unit is not found at its span in the document")
            offsets = doc_offsets[document]
            window = unit_window(offsets, start, end, budget, seed=i)
            if window is None:
                counts["dropped_unit_too_long_for_doc_window"] += 1
                continue
            a, b = window
            if a == 0:  # the unit lies within the first max_doc_length tokens
                counts["fits"] += 1
                kept.append(row)
            else:
                counts["windowed"] += 1
                cut, end = offsets[a][0], offsets[b - 1][1]
                windowed = (query, document[cut:end], unit, doc_id)
                if self.has_sentences:
                    windowed += window_sentences(row[4], row[5], cut, end)
                kept.append(windowed)
        self.stats = counts
        return kept

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        names = REQUIRED_COLUMNS + SENTENCE_COLUMNS if self.has_sentences else REQUIRED_COLUMNS
        return dict(zip(names, self.rows[i], strict=True))


def window_sentences(spans: list[tuple[int, int]], unit_index: int, cut: int, end: int) -> tuple[list, int]:
    """Sentence spans and unit index of the document window [cut, end), in the
    window's own characters; a sentence the window cuts keeps its inner part."""
    kept, index = [], -1
    for i, (s, e) in enumerate(spans):
        if e > cut and s < end:
            if i == unit_index:
                index = len(kept)
            kept.append((max(s, cut) - cut, min(e, end) - cut))
    return kept, index


def token_sentences(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """(doc_tokens,) long: the sentence each token starts in, -1 for special
    and padding tokens (offset (0, 0)) and for tokens outside every span."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    out = torch.full((len(offsets),), -1, dtype=torch.long)
    for i, (s, e) in enumerate(spans):
        out[(ends > starts) & (starts >= s) & (starts < e)] = i
    return out


class Collate:
    """Tokenise a list of triples into padded tensors (picklable for DataLoader workers)."""

    def __init__(self, tokenizer, max_query_length: int, max_doc_length: int, max_unit_length: int):
        self.tokenizer = tokenizer
        self.lengths = (max_query_length, max_doc_length, max_unit_length)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        q_len, d_len, u_len = self.lengths
        with_sentences = "sentence_spans" in rows[0]
        out = {}
        for name, key, length in (("query", "query", q_len), ("doc", "document", d_len), ("unit", "unit", u_len)):
            enc = self.tokenizer(
                [r[key] for r in rows], padding=True, truncation=True, max_length=length, return_tensors="pt",
                return_offsets_mapping=with_sentences and name == "doc",
            )
            out[f"{name}_ids"] = enc["input_ids"]
            out[f"{name}_mask"] = enc["attention_mask"]
            if "offset_mapping" in enc:
                # Sentence of each document token and the unit's sentence: the localisation loss's inputs.
                out["doc_sentence"] = torch.stack(
                    [token_sentences(enc["offset_mapping"][i], r["sentence_spans"]) for i, r in enumerate(rows)]
                )
                out["unit_sentence"] = torch.tensor([r["unit_index"] for r in rows], dtype=torch.long)
        out["doc_key"] = doc_keys([r["doc_id"] for r in rows])
        return out


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way (resume from a checkpoint).

    ``skip`` samples of this process's share are skipped in the next epoch
    only; the order is the same as without the skip (seeded by the epoch).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip
