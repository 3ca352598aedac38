"""Does the model read the document? Three held-out diagnostics beside R@k.

- ``d_doc``: how much the LM loss of the unit rises when each query's
  document is swapped for another document of the set. Near 0: the decoder
  rebuilds the unit from the query alone and gives the cross-attention no
  reason to find it.
- ``d_pair``: the same with the query and the document both swapped (what
  the unit costs with no help at all); ``d_doc`` is read against it.
- ``lift``: the attention mass a fusion layer puts on the unit's tokens,
  divided by the unit's share of the document's tokens (1.0: no preference).

Recorded at step 0 and at every held-out evaluation, so a run shows what
training added to what the initialisation gave.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch


def swap_order(documents: Sequence[str], seed: int = 0) -> list[int]:
    """A seeded permutation that pairs each row with a row of another document,
    where the set has one (a set of one document can only pair rows with
    their own document, and then d_doc is 0)."""
    n = len(documents)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    for i in range(n):
        if documents[order[i]] != documents[i]:
            continue
        for j in rng.sample(range(n), n):  # swap with a partner that stays valid after the swap
            if documents[order[j]] != documents[i] and documents[order[i]] != documents[j]:
                order[i], order[j] = order[j], order[i]
                break
    return order


@torch.no_grad()
def document_states(model, documents: Sequence[str], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """E_d token states of each distinct document, unpadded (tokens, hidden)."""
    model.eval()
    distinct = sorted(set(documents), key=len)  # similar lengths share a batch: less padding
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(distinct), batch_size):
        chunk = distinct[i : i + batch_size]
        d = model._tokenize(chunk, model.gear_config.inference_max_doc_length).to(model.device)
        states = model.doc_states(d["input_ids"], d["attention_mask"])
        for j, text in enumerate(chunk):
            out[text] = states[j, : int(d["attention_mask"][j].sum())]
    return out


@torch.no_grad()
def fused_rows(model, queries: Sequence[str], documents: Sequence[str], states: dict[str, torch.Tensor],
               batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, the fusion states of (query, document) and the query's token ids,
    both without padding: (query tokens, hidden) and (query tokens,)."""
    model.eval()
    out = []
    for i in range(0, len(queries), batch_size):
        q = model._tokenize(queries[i : i + batch_size], model.gear_config.max_query_length).to(model.device)
        docs = [states[d] for d in documents[i : i + batch_size]]
        d_states = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
        d_mask = torch.zeros(d_states.shape[:2], dtype=torch.long, device=model.device)
        for j, x in enumerate(docs):
            d_mask[j, : len(x)] = 1
        fused, _ = model.fuse(q["input_ids"], q["attention_mask"], d_states, d_mask)
        lengths = q["attention_mask"].sum(1).tolist()
        out += [(fused[j, :n], q["input_ids"][j, :n]) for j, n in enumerate(lengths)]
    return out


@torch.no_grad()
def unit_losses(model, rows: Sequence[tuple[torch.Tensor, torch.Tensor]], units: Sequence[str],
                batch_size: int = 16) -> np.ndarray:
    """Per-row LM loss (mean over the unit's tokens) of each unit given a row of ``fused_rows``."""
    model.eval()
    pad = model.tokenizer.pad_token_id or 0
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        fused = torch.nn.utils.rnn.pad_sequence([f for f, _ in chunk], batch_first=True)
        q_ids = torch.nn.utils.rnn.pad_sequence([ids for _, ids in chunk], batch_first=True, padding_value=pad)
        q_mask = torch.zeros(fused.shape[:2], dtype=torch.long, device=model.device)
        for j, (f, _) in enumerate(chunk):
            q_mask[j, : len(f)] = 1
        u = model._tokenize(units[i : i + batch_size], model.gear_config.max_unit_length).to(model.device)
        out.append(model.lm_loss(fused, q_mask, u["input_ids"], u["attention_mask"], per_row=True, q_ids=q_ids).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def lm_loss_per_row(model, queries: Sequence[str], documents: Sequence[str], units: Sequence[str],
                    batch_size: int = 16, states: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """Per-row LM loss (mean over the unit's tokens) of the unit given (query,
    document); ``states``: the documents' E_d states when already computed."""
    states = states if states is not None else document_states(model, documents, batch_size)
    return unit_losses(model, fused_rows(model, queries, documents, states, batch_size), units, batch_size)


def document_dependence(model, queries: Sequence[str], documents: Sequence[str], units: Sequence[str],
                        seed: int = 0) -> dict[str, float]:
    """Held-out LM loss with the true inputs, with the document swapped and
    with query and document swapped; ``d_doc`` and ``d_pair`` are the rises.
    Each distinct document is encoded once for all three, and the swapped
    pairs reuse the true pairs' fusion states (the same query and document)."""
    order = swap_order(documents, seed)
    states = document_states(model, documents)
    true_rows = fused_rows(model, queries, documents, states)
    true = unit_losses(model, true_rows, units)
    doc_swapped = lm_loss_per_row(model, queries, [documents[j] for j in order], units, states=states)
    pair_swapped = unit_losses(model, [true_rows[j] for j in order], units)
    return {
        "lm": float(true.mean()), "lm_doc_swapped": float(doc_swapped.mean()),
        "lm_pair_swapped": float(pair_swapped.mean()),
        "d_doc": float((doc_swapped - true).mean()), "d_pair": float((pair_swapped - true).mean()),
        "n": len(queries),
    }


def attention_lift(per_token: np.ndarray, offsets: np.ndarray, unit_span: tuple[int, int]) -> np.ndarray:
    """Lift of the unit under per-document-token attention (..., doc_tokens).

    Mass on the tokens that start inside ``unit_span``, over the mass on all
    the document's real tokens ([CLS]/[SEP] left out), divided by the unit's
    share of those tokens. NaN when the unit has no token (truncated away).
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    unit = real & (starts >= unit_span[0]) & (starts < unit_span[1])
    if not unit.any():
        return np.full(per_token.shape[:-1], np.nan)
    share = unit.sum() / real.sum()
    mass = per_token[..., unit].sum(-1) / np.maximum(per_token[..., real].sum(-1), 1e-12)
    return mass / share


def bootstrap_interval(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of ``values`` over resampled queries."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def is_punctuation_only(text: str) -> bool:
    """True for a generation with no letter or digit (empty included)."""
    return not any(ch.isalnum() for ch in text)


__all__ = ["attention_lift", "bootstrap_interval", "document_dependence", "fused_rows", "is_punctuation_only",
           "lm_loss_per_row", "swap_order", "unit_losses"]
