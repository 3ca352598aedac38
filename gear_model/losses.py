"""GeAR's training objective (paper section 3.4): contrastive + LM.

``GearPretrainer`` wraps a ``GearModel`` with what only training needs:
momentum copies of E_q and E_d (MoCo/BLIP, momentum 0.995) and a queue of
their features with the document id of each entry.

Contrastive loss, per direction (query->doc and doc->query):
- keys = the global batch's online features (all-gathered *with* gradient, so
  the in-batch negatives train both encoders, CLIP-style) followed by the
  queue of momentum features (no gradient);
- hard targets: every key with the same document id as the query is a
  positive (so triples of one document are never negatives of each other,
  in the batch or in the queue), normalised to sum to 1;
- soft targets: softmax of the momentum encoders' similarities over the same
  keys (the batch part from the gathered momentum features), mixed in with
  weight ``alpha`` (ramped 0 -> 0.4 by the trainer);
- loss = mean over queries of the cross-entropy with the mixed targets, the
  two directions averaged.
Total loss = itc + lm_weight * lm (+ loc_weight * loc, the optional
localisation loss that is not in the paper: ``localisation_loss``);
lm_weight 0 skips the decoder, and the fusion too unless loc_weight > 0.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from gear_model.doc_states import DocumentStateStore, pad_states
from gear_model.fusion import eager_attention
from gear_model.model import GearModel, mean_pool

NO_DOC = -1  # doc id of queue slots that hold no real entry yet


def doc_id_hash(doc_id: str) -> int:
    """A stable non-negative int64 id for a document id string (same in every process)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little") >> 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process in rank order; gradients flow back to each owner."""
    if not _distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def positive_targets(local_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Hard targets (B, K): 1 for every key of the same document, rows normalised to sum to 1.

    Every query's own document is among the keys (the global batch comes first).
    """
    pos = (local_ids[:, None] == key_ids[None, :]).float()
    return pos / pos.sum(1, keepdim=True)


def localisation_loss(
    weights: torch.Tensor, query_words: torch.Tensor, doc_sentence: torch.Tensor, unit_sentence: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of the unit among its document's sentences, each scored
    as ``GearModel.localize(pooling="mean")`` scores it.

    weights: (B, heads, Lq, Ld) cross-attention of the localisation layer;
    query_words: (B, Lq) bool, the query's word tokens; doc_sentence: (B, Ld)
    the sentence of each document token (-1: none); unit_sentence: (B,) the
    unit's sentence (-1: not in the document window, row ignored).
    The sentences' scores are the log of their attention mass per token (the
    order localisation reads), divided by ``temperature``: at 1 a sentence's
    probability is proportional to its mass per token, which is only high
    once the attention is concentrated on the unit; below 1 the loss falls as
    soon as the unit leads the others, a ranking objective.
    """
    words = query_words.to(weights.dtype)
    per_doc_token = (weights.mean(1) * words[..., None]).sum(1) / words.sum(1, keepdim=True).clamp(min=1)
    n_sentences = int(doc_sentence.max().item()) + 1 if doc_sentence.numel() else 0
    keep = unit_sentence >= 0
    if n_sentences == 0 or not keep.any():
        return weights.sum() * 0.0
    member = F.one_hot(doc_sentence.clamp(min=0), n_sentences).to(weights.dtype) * (doc_sentence >= 0)[..., None]
    mass = torch.einsum("bl,bls->bs", per_doc_token, member)
    counts = member.sum(1)
    scores = torch.log(mass / counts.clamp(min=1) + 1e-12) / temperature
    return F.cross_entropy(scores.masked_fill(counts == 0, float("-inf"))[keep], unit_sentence[keep])


@dataclass
class LossOutput:
    loss: torch.Tensor
    itc: torch.Tensor
    lm: torch.Tensor
    loc: torch.Tensor


class GearPretrainer(nn.Module):
    def __init__(self, model: GearModel, momentum_eval_mode: bool = False, freeze_doc_encoder: bool = False):
        super().__init__()
        cfg = model.gear_config
        self.model = model
        self.momentum = cfg.momentum
        self.momentum_eval_mode = momentum_eval_mode
        self.lm_weight = cfg.lm_weight
        self.loc_weight = cfg.loc_weight
        self.label_smoothing = cfg.lm_label_smoothing
        self.freeze_doc_encoder = freeze_doc_encoder
        # A frozen E_d in eval mode maps a document to the same states every
        # epoch, so they are computed once per distinct document (token ids).
        self._doc_state_cache: dict[tuple[int, ...], torch.Tensor] = {}
        # On disk and shared with the run's other processes (``TrainConfig.doc_state_store``).
        self.doc_state_store: DocumentStateStore | None = None
        self.query_encoder_m = copy.deepcopy(model.query_encoder).requires_grad_(False)
        if freeze_doc_encoder:
            # A frozen E_d is its own momentum copy: no second copy, no second forward.
            model.doc_encoder.requires_grad_(False)
            self.doc_encoder_m = None
        else:
            self.doc_encoder_m = copy.deepcopy(model.doc_encoder).requires_grad_(False)
        if self.lm_weight == 0:
            # Contrastive-only baseline: the decoder (and, without the
            # localisation loss, the fusion) stays as initialised and is not
            # trained (nor seen by DDP).
            model.decoder.requires_grad_(False)
            if self.loc_weight == 0:
                model.fusion.requires_grad_(False)

        dim = model.query_encoder.config.hidden_size
        size = cfg.queue_size
        # Random unit vectors, like MoCo/BLIP, until real features replace them.
        self.register_buffer("query_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("doc_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("id_queue", torch.full((size,), NO_DOC, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def frozen_doc_states(self, d_ids: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
        """E_d states of a batch from the per-document cache (padding is masked
        everywhere downstream, so padded positions are left zero). A document
        that no process has encoded yet is encoded alone, unpadded and in fp32
        (``GearModel.document_states_alone``): its states are then the same
        bits whichever process of the run, batch or precision reaches it first."""
        keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(d_ids, d_mask)]
        missing = [i for i, k in enumerate(keys) if k not in self._doc_state_cache]
        if missing and self.doc_state_store is not None:  # encoded by another process of this run
            for i in missing:
                stored = self.doc_state_store.get(torch.tensor(keys[i]))
                if stored is not None:
                    self._doc_state_cache[keys[i]] = stored.to(d_ids.device)
            missing = [i for i in missing if keys[i] not in self._doc_state_cache]
        for i in missing:
            if keys[i] in self._doc_state_cache:  # the same document twice in the batch
                continue
            self._doc_state_cache[keys[i]] = self.model.document_states_alone(d_ids[i][d_mask[i].bool()])
            if self.doc_state_store is not None:
                self.doc_state_store.put(torch.tensor(keys[i]), self._doc_state_cache[keys[i]])
        return pad_states([self._doc_state_cache[k] for k in keys], d_ids)

    def momentum_pairs(self):
        pairs = [(self.model.query_encoder, self.query_encoder_m)]
        if self.doc_encoder_m is not None:
            pairs.append((self.model.doc_encoder, self.doc_encoder_m))
        return pairs

    @torch.no_grad()
    def momentum_update(self) -> None:
        for online, target in self.momentum_pairs():
            for p, p_m in zip(online.parameters(), target.parameters(), strict=True):
                p_m.data.mul_(self.momentum).add_(p.data, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, query_feat_m: torch.Tensor, doc_feat_m: torch.Tensor, ids: torch.Tensor) -> None:
        """Write the global batch's momentum features over the oldest queue slots."""
        size = self.id_queue.numel()
        n = ids.numel()
        if size == 0:
            return
        if size % n:
            raise ValueError(f"queue size {size} is not divisible by the global batch {n}")
        ptr = int(self.queue_ptr)
        self.query_queue[:, ptr : ptr + n] = query_feat_m.T.to(self.query_queue.dtype)
        self.doc_queue[:, ptr : ptr + n] = doc_feat_m.T.to(self.doc_queue.dtype)
        self.id_queue[ptr : ptr + n] = ids
        self.queue_ptr.fill_((ptr + n) % size)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.momentum_eval_mode:
            for _, target in self.momentum_pairs():
                target.eval()
        if self.freeze_doc_encoder:
            self.model.doc_encoder.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor], alpha: float) -> LossOutput:
        m = self.model
        q_ids, q_mask = batch["query_ids"], batch["query_mask"]
        d_ids, d_mask = batch["doc_ids"], batch["doc_mask"]
        with torch.no_grad():
            m.temp.clamp_(m.gear_config.temp_min, m.gear_config.temp_max)

        q_feat = m.embed_queries(q_ids, q_mask)
        d_states = self.frozen_doc_states(d_ids, d_mask) if self.freeze_doc_encoder else m.doc_states(d_ids, d_mask)
        d_feat = F.normalize(mean_pool(d_states, d_mask).float(), dim=-1)

        ids = gather_no_grad(batch["doc_key"])
        hard = positive_targets(batch["doc_key"], torch.cat([ids, self.id_queue]))

        with torch.no_grad():
            self.momentum_update()
            q_feat_m = m.embed_queries(q_ids, q_mask, encoder=self.query_encoder_m)
            if self.doc_encoder_m is None:
                d_feat_m = d_feat.detach()
            else:
                d_feat_m = F.normalize(mean_pool(m.doc_states(d_ids, d_mask, self.doc_encoder_m), d_mask).float(), dim=-1)
            q_m_global, d_m_global = gather_no_grad(q_feat_m), gather_no_grad(d_feat_m)
            q_keys_m = torch.cat([q_m_global, self.query_queue.T.float()])
            d_keys_m = torch.cat([d_m_global, self.doc_queue.T.float()])
            soft_q2d = F.softmax(q_feat_m @ d_keys_m.T / m.temp, dim=1)
            soft_d2q = F.softmax(d_feat_m @ q_keys_m.T / m.temp, dim=1)
            target_q2d = alpha * soft_q2d + (1 - alpha) * hard
            target_d2q = alpha * soft_d2q + (1 - alpha) * hard

        d_keys = torch.cat([gather_with_grad(d_feat), self.doc_queue.T.float()])
        q_keys = torch.cat([gather_with_grad(q_feat), self.query_queue.T.float()])
        sim_q2d = q_feat @ d_keys.T / m.temp
        sim_d2q = d_feat @ q_keys.T / m.temp
        loss_q2d = -(F.log_softmax(sim_q2d, dim=1) * target_q2d).sum(1).mean()
        loss_d2q = -(F.log_softmax(sim_d2q, dim=1) * target_d2q).sum(1).mean()
        itc = (loss_q2d + loss_d2q) / 2
        self.enqueue(q_m_global, d_m_global, ids)

        zero = torch.zeros((), device=itc.device)
        lm, loc, loss = zero, zero, itc
        if self.lm_weight > 0 or self.loc_weight > 0:
            if self.loc_weight > 0:
                if "doc_sentence" not in batch:
                    raise ValueError("loc_weight > 0 needs the triples' sentence_spans and unit_index columns")
                every_layer = m.gear_config.loc_layers == "all"
                with eager_attention(m.query_encoder.config):  # SDPA returns no attention weights
                    fused, weights = m.fuse(q_ids, q_mask, d_states, d_mask,
                                            return_layer=0 if every_layer else m.resolve_layer(None))
                words = m.query_word_mask(q_ids)
                loc = torch.stack([
                    localisation_loss(w, words, batch["doc_sentence"], batch["unit_sentence"], m.gear_config.loc_temperature)
                    for w in (weights if every_layer else [weights])]).mean()
                loss = loss + self.loc_weight * loc
            else:
                fused, _ = m.fuse(q_ids, q_mask, d_states, d_mask)
            if self.lm_weight > 0:
                lm = m.lm_loss(fused, q_mask, batch["unit_ids"], batch["unit_mask"], label_smoothing=self.label_smoothing,
                                q_ids=q_ids)
                loss = loss + self.lm_weight * lm
        return LossOutput(loss=loss, itc=itc.detach(), lm=lm.detach(), loc=loc.detach())


def doc_keys(doc_ids: Sequence[str]) -> torch.Tensor:
    return torch.tensor([doc_id_hash(d) for d in doc_ids], dtype=torch.long)
