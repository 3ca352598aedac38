"""Baseline encoders: a pre-trained sentence encoder used as is.

Embedded default: all-MiniLM-L6-v2 with mean pooling through plain
transformers (its published pooling). Production: BGE through FlagEmbedding
(``backend="flagembedding"``, ``pooling="cls"``, the BGE query instruction).
Both expose the ``encode_queries`` / ``encode_documents`` interface of
GearModel, so retrieval and localisation treat every dense model alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class PretrainedEncoder:
    def __init__(
        self,
        path: str | Path,
        pooling: str = "mean",
        backend: str = "transformers",
        max_length: int = 512,
        query_instruction: str = "",
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.path, self.pooling, self.backend = str(path), pooling, backend
        self.max_length, self.query_instruction = max_length, query_instruction
        if backend == "transformers":
            import torch
            from transformers import AutoModel, AutoTokenizer

            self._torch = torch
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).eval()
            # A tokenizer's advertised max length can exceed the model's positions.
            positions = getattr(self.model.config, "max_position_embeddings", max_length)
            self.max_length = min(max_length, positions)
        elif backend == "flagembedding":
            from FlagEmbedding import FlagModel

            self.model = FlagModel(
                self.path,
                pooling_method=pooling,
                normalize_embeddings=True,
                use_fp16=False,
                query_instruction_for_retrieval=query_instruction or None,
                devices="cpu",
            )
        else:
            raise ValueError(f"backend must be 'transformers' or 'flagembedding', got {backend!r}")

    def describe(self) -> str:
        return f"{Path(self.path).name} ({self.pooling} pooling, {self.backend})"

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if self.backend == "flagembedding":
            return np.asarray(self.model.encode_queries(list(texts), batch_size=batch_size, max_length=self.max_length), dtype=np.float32)
        return self._encode([self.query_instruction + t for t in texts], batch_size)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if self.backend == "flagembedding":
            return np.asarray(self.model.encode_corpus(list(texts), batch_size=batch_size, max_length=self.max_length), dtype=np.float32)
        return self._encode(list(texts), batch_size)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Normalised embeddings in the order of ``texts``. Batches are cut from the
        texts sorted by length, so a batch pads little; padding is masked out,
        so a text's embedding does not depend on its batch."""
        torch = self._torch
        dim = self.model.config.hidden_size
        out = np.zeros((len(texts), dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                rows = order[i : i + batch_size]
                batch = self.tokenizer([texts[j] for j in rows], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                states = self.model(**batch).last_hidden_state
                if self.pooling == "cls":
                    emb = states[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                    emb = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(emb.float(), dim=-1).numpy()
        return out
