"""E_d token states of single documents, kept on disk between processes.

With a frozen document encoder, every process of a run reads the same
documents through the same E_d: the GeAR run and its contrastive-only
baseline train on the same documents, and the held-out evaluation during
training and evaluate-gear's localisation read the same test documents. A
store keyed by the encoder's fingerprint (``GearModel.document_encoder_fingerprint``)
and a document's token ids lets each document go through E_d once per run.
Entries are written atomically (a temporary file, then a rename), so
processes that share a store never read half an entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATES = "states"


DEFAULT_MAX_BYTES = 2 << 30



def pad_states(per_document: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Unpadded (tokens, hidden) states, one per row of the padded batch ``ids``
    (rows, length), as one (rows, length, hidden) tensor on ``ids``' device;
    padded positions stay zero (every reader masks them)."""
    first = per_document[0]
    out = torch.zeros(*ids.shape, first.shape[-1], dtype=first.dtype, device=ids.device)
    for i, states in enumerate(per_document):
        out[i, : len(states)] = states.to(ids.device)
    return out

class DocumentStateStore:
    """(tokens, hidden) float tensors by token ids, under ``root/<fingerprint>``.

    ``read_only``: look up what another process stored, write nothing (an
    evaluation of a large external set must not fill the disk). Writing stops
    once the folder holds ``max_bytes``: past that, documents are encoded as
    if there were no store.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, read_only: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.dir = Path(root) / fingerprint[:24]
        self.read_only, self.max_bytes = read_only, max_bytes
        self.hits = self.misses = 0
        # Only a writer needs the folder's size, for its cap.
        self.bytes = 0 if read_only or not self.dir.is_dir() else \
            sum(f.stat().st_size for f in self.dir.rglob("*.safetensors"))

    def _path(self, ids: torch.Tensor) -> Path:
        digest = hashlib.sha256(ids.detach().to(torch.int64).cpu().numpy().tobytes()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The states of the document with these (unpadded) token ids, or None."""
        path = self._path(ids)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return load_file(str(path))[STATES]

    def put(self, ids: torch.Tensor, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.read_only or self.bytes + size > self.max_bytes:
            return
        path = self._path(ids)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({STATES: states.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)
            self.bytes += path.stat().st_size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
