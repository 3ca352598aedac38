"""Training triples (query, document, unit) from the dataset's train.parquet."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, DistributedSampler

from gear_model.losses import doc_keys

REQUIRED_COLUMNS = ("query", "document", "unit", "doc_id")


def train_parquet(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/train.parquet``."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no training triples at {path} (give train.parquet or its dataset folder)")
    return path


class TriplesDataset(Dataset):
    def __init__(self, path: str | Path):
        self.path = train_parquet(path)
        table = pq.read_table(self.path)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{self.path}: missing columns {missing} (has {table.column_names})")
        cols = {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS}
        for c, values in cols.items():
            bad = [i for i, v in enumerate(values) if not v]
            if bad:
                raise ValueError(f"{self.path}: row {bad[0]} has an empty {c!r} ({len(bad)} such rows)")
        self.rows = list(zip(*(cols[c] for c in REQUIRED_COLUMNS), strict=True))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, str]:
        return dict(zip(REQUIRED_COLUMNS, self.rows[i], strict=True))


class Collate:
    """Tokenise a list of triples into padded tensors (picklable for DataLoader workers)."""

    def __init__(self, tokenizer, max_query_length: int, max_doc_length: int, max_unit_length: int):
        self.tokenizer = tokenizer
        self.lengths = (max_query_length, max_doc_length, max_unit_length)

    def __call__(self, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        q_len, d_len, u_len = self.lengths
        out = {}
        for name, key, length in (("query", "query", q_len), ("doc", "document", d_len), ("unit", "unit", u_len)):
            enc = self.tokenizer(
                [r[key] for r in rows], padding=True, truncation=True, max_length=length, return_tensors="pt"
            )
            out[f"{name}_ids"] = enc["input_ids"]
            out[f"{name}_mask"] = enc["attention_mask"]
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
