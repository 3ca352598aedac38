"""GeAR: bi-encoder (E_q, E_d), fusion encoder and text decoder (paper section 3.3).

- E_q, E_d: two BERT encoders with mean pooling and L2-normalised embeddings;
- fusion: E_q's layers plus one cross-attention block per layer attending to
  E_d's token states (``fusion.FusionEncoder``); bidirectional;
- decoder: a BERT LM-head model with causal self-attention and cross-attention
  to the fusion states; ``[DEC]`` starts every sequence; with
  ``copy_from_query`` (not in the paper) a pointer-generator head that can
  copy the query's words (``copying.py``);
- a learned contrastive temperature (BLIP: init 0.07, clamped to [0.001, 0.5]).

No training code here: the momentum encoders, queue and losses live in
``losses.py``. A saved model is a directory with config.json (the BERT
config plus a ``gear`` section), model.safetensors and the tokenizer files.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel
from transformers import logging as hf_logging
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from gear_model.config import CrossAttentionInit, GearConfig
from gear_model.copying import COPY_PARAMETER_PREFIXES, QueryCopyingLMHeadModel
from gear_model.decoding import DEFAULT_NO_REPEAT_NGRAM, DEFAULT_NUM_BEAMS, GENERATION_BATCH, SENTENCE_END_TOKENS
from gear_model.doc_states import DocumentStateStore, pad_states
from gear_model.fusion import FusionEncoder, eager_attention

CONFIG_NAME = "config.json"
CROSS_ATTENTION_INITS = get_args(CrossAttentionInit)
WEIGHTS_NAME = "model.safetensors"


class CrossAttention(NamedTuple):
    """Cross-attention of one fusion layer for one (query, document) pair.

    weights: (heads, query_tokens, doc_tokens) float32; every row sums to 1
        over the document tokens (special tokens [CLS]/[SEP] included).
    offsets: (doc_tokens, 2) int64 character spans of the document tokens in
        the document text, end exclusive; (0, 0) for special tokens.
    query_mask: (query_tokens,) bool, False for the query's special tokens.
    """

    weights: np.ndarray
    offsets: np.ndarray
    query_mask: np.ndarray


def span_pairs(sentence_spans: Sequence[tuple[int, int]] | Sequence[dict[str, int]]) -> np.ndarray:
    """(n, 2) int64 [start, end) pairs from (start, end) pairs or {"start", "end"} dicts (the triples' SPAN)."""
    pairs = [(s["start"], s["end"]) if isinstance(s, dict) else tuple(s) for s in sentence_spans]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def sentence_membership(offsets: np.ndarray, sentence_spans) -> np.ndarray:
    """(n_sentences, doc_tokens) bool: a document token belongs to the sentence
    its first character lies in; special tokens (offset (0, 0)) belong nowhere."""
    spans = span_pairs(sentence_spans)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    return real[None] & (starts[None] >= spans[:, :1]) & (starts[None] < spans[:, 1:])


def pool_sentences(per_token: np.ndarray, membership: np.ndarray, pooling: str = "sum") -> np.ndarray:
    """Sentence scores (..., n_sentences) from per-document-token weights (..., doc_tokens):
    the attention mass on each sentence (``sum``) or mass per token (``mean``);
    a sentence with no token inside the (truncated) document scores 0."""
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', not {pooling!r}")
    member = membership.astype(np.float32)
    mass = np.asarray(per_token, dtype=np.float32) @ member.T
    if pooling == "mean":
        counts = member.sum(1)
        mass = np.where(counts > 0, mass / np.maximum(counts, 1), 0.0).astype(np.float32)
    return mass


def sentence_scores_from_attention(
    att: CrossAttention, sentence_spans: Sequence[tuple[int, int]] | Sequence[dict[str, int]], pooling: str = "sum"
) -> np.ndarray:
    """One score per sentence from one layer's cross-attention (see ``GearModel.localize``)."""
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', not {pooling!r}")
    per_query_token = att.weights.mean(0)  # (Lq, Ld)
    rows = per_query_token[att.query_mask] if att.query_mask.any() else per_query_token
    return pool_sentences(rows.mean(0), sentence_membership(att.offsets, sentence_spans), pooling)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # Loading a plain BERT checkpoint into the decoder reports every fresh
    # cross-attention weight; that is expected here, so hide the report.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class DocumentStateMemo:
    """E_d states by input, least recently used first out past ``max_bytes``
    (a large evaluation set cannot fill memory; it only reuses less); a
    single document's states also come from, and go to, ``store``."""

    def __init__(self, max_bytes: int = 1 << 30, store: DocumentStateStore | None = None):
        self.max_bytes, self.bytes = max_bytes, 0
        self.store = store  # on disk, shared with other processes (gear_model/doc_states.py)
        self._states: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        states = self._states.get(key)
        if states is not None:
            self._states.move_to_end(key)
        return states

    def put(self, key: tuple, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.max_bytes:
            return
        self._states[key] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._states.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def __len__(self) -> int:
        return len(self._states)


class GearModel(nn.Module):
    def __init__(self, bert_config: BertConfig, gear_config: GearConfig, tokenizer):
        super().__init__()
        self.gear_config = gear_config
        self.tokenizer = tokenizer
        self.dec_token_id = tokenizer.convert_tokens_to_ids(gear_config.dec_token)
        if self.dec_token_id is None or self.dec_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer lacks the decoder start token {gear_config.dec_token!r}")

        enc_config = BertConfig.from_dict(bert_config.to_dict())
        enc_config.is_decoder = False
        enc_config.add_cross_attention = False
        self.query_encoder = BertModel(enc_config, add_pooling_layer=False)
        self.doc_encoder = BertModel(BertConfig.from_dict(enc_config.to_dict()), add_pooling_layer=False)
        self.fusion = FusionEncoder(self.query_encoder.config)

        dec_config = BertConfig.from_dict(bert_config.to_dict())
        dec_config.is_decoder = True
        dec_config.add_cross_attention = True
        dec_config.vocab_size = len(tokenizer)
        dec_config.tie_word_embeddings = True
        self.decoder = (QueryCopyingLMHeadModel if gear_config.copy_from_query else BertLMHeadModel)(dec_config)

        self.temp = nn.Parameter(torch.tensor(gear_config.temp_init))
        # Names of the parameters that no checkpoint initialised (``from_encoder``
        # fills it; a saved GeAR model has none): the parts a learning-rate
        # multiplier for new modules is meant for.
        self.fresh_parameters: frozenset[str] = frozenset()
        # E_d states of inputs seen before, while ``reusing_document_states`` is on.
        self._document_state_memo: DocumentStateMemo | None = None
        # Vocabulary ids a copying decoder may copy (``copyable_token_mask``), built on first use.
        self._copyable_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------
    # Construction, saving, loading.

    @classmethod
    def from_encoder(
        cls, bert_dir: str | Path, gear_config: GearConfig | None = None, cross_attention_init: str = "random",
        decoder_cross_attention_init: str = "random",
    ) -> GearModel:
        """Initialise every part from a BERT checkpoint directory.

        E_q and E_d load the encoder weights; the decoder loads them too (its
        cross-attention, and the LM-head transform and bias when the checkpoint
        has no MLM head, start fresh; the LM head is tied to its word
        embeddings, and ``[DEC]`` is added to its vocabulary); the
        fusion cross-attention blocks start fresh (``"random"``, BERT's init
        as in BLIP), as copies of E_q's self-attention of the same layer
        (``"self_attention"``), or with identity query and key projections
        (``"identity"``: each head's attention logits start as the scaled dot
        product of the query token's and the document token's states, a
        similarity prior; values and output stay BERT-initialised). The
        decoder's cross-attention starts fresh (``"random"``) or as a copy of
        its own self-attention of the same layer (``"self_attention"``), so
        that it reads the fusion states from the first step.
        """
        if decoder_cross_attention_init not in ("random", "self_attention"):
            raise ValueError("decoder_cross_attention_init must be 'random' or 'self_attention', "
                             f"not {decoder_cross_attention_init!r}")
        if cross_attention_init not in CROSS_ATTENTION_INITS:
            raise ValueError(f"cross_attention_init must be one of {CROSS_ATTENTION_INITS}, not {cross_attention_init!r}")
        gear_config = gear_config or GearConfig()
        tokenizer = AutoTokenizer.from_pretrained(str(bert_dir))
        tokenizer.add_special_tokens({"additional_special_tokens": [gear_config.dec_token]})
        with _quiet_transformers():
            bert_config = BertConfig.from_pretrained(str(bert_dir))
            model = cls(bert_config, gear_config, tokenizer)
            enc = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False)
            model.query_encoder.load_state_dict(enc.state_dict())
            model.doc_encoder.load_state_dict(enc.state_dict())
            dec, loading = BertLMHeadModel.from_pretrained(
                str(bert_dir), is_decoder=True, add_cross_attention=True, output_loading_info=True
            )
            dec.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            missing, unexpected = model.decoder.load_state_dict(dec.state_dict(), strict=False)
            if unexpected or any(not name.startswith(COPY_PARAMETER_PREFIXES) for name in missing):
                raise ValueError(f"{bert_dir}: decoder weights missing {missing}, unexpected {unexpected}")
            model.decoder.tie_weights()
        # What the checkpoint did not hold is new, whatever the cross-attention
        # init copies into the fusion blocks (none of them was trained for fusion).
        decoder_names = {name for name, _ in model.decoder.named_parameters()}
        model.fresh_parameters = frozenset(
            [f"fusion.{name}" for name, _ in model.fusion.named_parameters()]
            + [f"decoder.{name}" for name in loading["missing_keys"] if name in decoder_names]
            + [f"decoder.{name}" for name in missing]
        )
        if decoder_cross_attention_init == "self_attention":
            for layer in model.decoder.bert.encoder.layer:
                layer.crossattention.load_state_dict(layer.attention.state_dict())
        if cross_attention_init == "self_attention":
            for cross, layer in zip(model.fusion.cross, model.query_encoder.encoder.layer, strict=True):
                cross.load_state_dict(layer.attention.state_dict())
        elif cross_attention_init == "identity":
            with torch.no_grad():
                for cross in model.fusion.cross:
                    for projection in (cross.self.query, cross.self.key):
                        nn.init.eye_(projection.weight)
                        nn.init.zeros_(projection.bias)
        return model

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = self.query_encoder.config.to_dict()
        config.pop("_attn_implementation_autoset", None)
        config["architectures"] = ["GearModel"]
        config["gear"] = self.gear_config.to_dict()
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # save_model drops the tied LM-head copy; load_model re-ties it.
        save_model(self, str(out_dir / WEIGHTS_NAME))
        self.tokenizer.save_pretrained(str(out_dir))
        return out_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> GearModel:
        model_dir = Path(model_dir)
        config = json.loads((model_dir / CONFIG_NAME).read_text())
        if "gear" not in config:
            raise ValueError(f"{model_dir} is not a GeAR model directory (no 'gear' in config.json)")
        gear_config = GearConfig.from_dict(config.pop("gear"))
        config.pop("architectures", None)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = cls(BertConfig.from_dict(config), gear_config, tokenizer)
        missing, unexpected = load_model(model, str(model_dir / WEIGHTS_NAME), strict=False, device=str(device))
        # The tied LM-head weight is saved once, under the word embeddings.
        missing = [k for k in missing if k != "decoder.cls.predictions.decoder.weight"]
        if missing or unexpected:
            raise ValueError(f"{model_dir}: missing weights {missing}, unexpected {unexpected}")
        model.decoder.tie_weights()
        return model.to(device).eval()

    # ------------------------------------------------------------------
    # Building blocks used by training and inference.

    @property
    def device(self) -> torch.device:
        return self.temp.device

    @property
    def n_layers(self) -> int:
        return self.query_encoder.config.num_hidden_layers

    def resolve_layer(self, layer: int | None) -> int:
        """1-based fusion layer; None = the config's ``localize_layer`` or n_layers - 2."""
        if layer is None:
            layer = self.gear_config.localize_layer or max(1, self.n_layers - 2)
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"layer must be in 1..{self.n_layers} (1-based), got {layer}")
        return layer

    def embed_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder: BertModel | None = None):
        """Normalised mean-pooled query embeddings (B, H), with E_q or a given encoder (momentum)."""
        encoder = encoder or self.query_encoder
        states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(states, attention_mask).float(), dim=-1)

    def doc_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder: BertModel | None = None):
        encoder = encoder or self.doc_encoder
        memo = self._document_state_memo
        if memo is None or encoder is not self.doc_encoder or self.training or torch.is_grad_enabled():
            return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes())
        states = memo.get(key)
        if states is None:
            states = self._stored_or_encoded(encoder, input_ids, attention_mask, memo.store)
            memo.put(key, states)
        return states

    def _stored_or_encoded(self, encoder: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           store: DocumentStateStore | None) -> torch.Tensor:
        """E_d states of a batch, each document's from ``store`` (under its
        unpadded token ids) or else encoded alone and stored; padded positions
        stay zero, as every reader masks them."""
        lengths = attention_mask.sum(1).tolist()
        right_padded = all(bool(attention_mask[i, :n].all()) for i, n in enumerate(lengths))
        if store is None or not right_padded:
            return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        found: dict[bytes, torch.Tensor] = {}  # a document twice in the batch is read or encoded once
        rows = []
        for i, n in enumerate(lengths):
            ids = input_ids[i, :n]
            key = ids.cpu().numpy().tobytes()
            if key not in found:
                found[key] = store.get(ids)
                if found[key] is None:
                    found[key] = self.document_states_alone(ids, encoder)
                    store.put(ids, found[key])
            rows.append(found[key])
        return pad_states(rows, input_ids)

    @torch.no_grad()
    def document_states_alone(self, ids: torch.Tensor, encoder: BertModel | None = None) -> torch.Tensor:
        """E_d's states (n, H) of one document's unpadded token ids, in fp32
        whatever autocast is on: what the run's processes share through the
        document-state store, so they must not depend on the batch, its
        padding or the caller's precision."""
        encoder = encoder or self.doc_encoder
        mask = torch.ones(1, len(ids), dtype=torch.long, device=ids.device)
        with torch.autocast(ids.device.type, enabled=False):
            return encoder(input_ids=ids.unsqueeze(0), attention_mask=mask).last_hidden_state[0].float()

    @contextlib.contextmanager
    def reusing_document_states(self, memo: DocumentStateMemo | None = None) -> Iterator[DocumentStateMemo]:
        """Inside the block, inference reuses E_d's states of an input it has
        encoded before (evaluation reads each document once for localisation,
        diagnostics and generation). ``memo`` carries them across blocks; its
        owner must drop it when E_d changes (``document_encoder_fingerprint``).
        Training passes (train mode or gradients on) never use it."""
        memo = DocumentStateMemo() if memo is None else memo
        previous, self._document_state_memo = self._document_state_memo, memo
        try:
            yield memo
        finally:
            self._document_state_memo = previous

    def fuse(self, q_ids, q_mask, d_states, d_mask, return_layer: int | None = None):
        return self.fusion(self.query_encoder, q_ids, q_mask, d_states, d_mask, return_layer=return_layer)

    def decoder_inputs(self, unit_ids: torch.Tensor, unit_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] unit [SEP] -> [DEC] unit [SEP]; labels are the ids, -100 on padding and [DEC]."""
        ids = unit_ids.clone()
        ids[:, 0] = self.dec_token_id
        labels = ids.masked_fill(unit_mask == 0, -100)
        labels[:, 0] = -100
        return ids, labels

    def lm_loss(self, fused, q_mask, unit_ids, unit_mask, per_row: bool = False, label_smoothing: float = 0.0,
                q_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the unit given the fusion states.

        Averaged over each unit's tokens, then over the batch, so the loss does
        not depend on how a global batch is split across processes
        (``per_row``: one loss per row, not averaged over the batch).
        ``q_ids``, the query's token ids, are what a copying decoder
        (``copy_from_query``) copies from; it needs them.
        """
        ids, labels = self.decoder_inputs(unit_ids, unit_mask)
        logits = self.decoder(
            input_ids=ids, attention_mask=unit_mask, encoder_hidden_states=fused, encoder_attention_mask=q_mask,
            **self.copy_sources(q_ids),
        ).logits
        logits, targets = logits[:, :-1].float(), labels[:, 1:]
        per_token = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=-100, reduction="none", label_smoothing=label_smoothing
        )
        n_tokens = (targets != -100).sum(1).clamp(min=1)
        rows = per_token.sum(1) / n_tokens
        return rows if per_row else rows.mean()

    def copy_sources(self, q_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The decoder's extra inputs for copying from the query (none without ``copy_from_query``)."""
        if not self.gear_config.copy_from_query:
            return {}
        if q_ids is None:
            raise ValueError("a decoder that copies from the query (copy_from_query) needs the query's token ids")
        return {"copy_source_ids": q_ids, "copy_source_mask": self.copyable_token_mask(q_ids)}

    def copyable_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, Lq) bool: the query's tokens a copying decoder may copy: word
        pieces with a letter or digit, not punctuation (the vocabulary has it,
        and a query's separators are no part of its unit) or special tokens."""
        if self._copyable_ids is None or self._copyable_ids.device != input_ids.device:
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            special = set(self.tokenizer.all_special_ids)
            self._copyable_ids = torch.tensor(
                [i not in special and any(c.isalnum() for c in token) for i, token in enumerate(vocab)],
                device=input_ids.device)
        return self._copyable_ids[input_ids]

    def query_word_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, Lq) bool: the query's word tokens (not [CLS], [SEP], [PAD] or [DEC])."""
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), device=input_ids.device)
        return ~torch.isin(input_ids, special)

    # ------------------------------------------------------------------
    # Inference API (numpy in, numpy out; no gradients).

    def _tokenize(self, texts: Sequence[str], max_length: int, **kw):
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt", **kw
        )

    @torch.no_grad()
    def encode_queries(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None) -> np.ndarray:
        """E_q embeddings, (n, hidden) float32, L2-normalised."""
        return self._encode(texts, batch_size, max_length or self.gear_config.max_query_length, self.query_encoder)

    @torch.no_grad()
    def encode_documents(self, texts: Sequence[str], batch_size: int = 32, max_length: int | None = None) -> np.ndarray:
        """E_d embeddings, (n, hidden) float32, L2-normalised."""
        length = max_length or self.gear_config.inference_max_doc_length
        if self._document_state_memo is not None:  # the states may be known already: pool them
            return self._pool_document_states(texts, batch_size, length)
        return self._encode(texts, batch_size, length, self.doc_encoder)

    @torch.no_grad()
    def _pool_document_states(self, texts: Sequence[str], batch_size: int, max_length: int) -> np.ndarray:
        """``_encode`` through ``doc_states``, so that the memo and its store serve it."""
        self.eval()
        out = [np.zeros((0, self.doc_encoder.config.hidden_size), dtype=np.float32)]
        for i in range(0, len(texts), batch_size):
            batch = self._tokenize(texts[i : i + batch_size], max_length).to(self.device)
            states = self.doc_states(batch["input_ids"], batch["attention_mask"])
            out.append(F.normalize(mean_pool(states, batch["attention_mask"]).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def document_encoder_fingerprint(self) -> str:
        """A digest of everything ``encode_documents`` depends on (E_d's
        weights, the tokenizer, the inference length): two models with the
        same fingerprint embed every document identically, e.g. GeAR and its
        contrastive-only baseline when both keep E_d frozen."""
        import hashlib

        digest = hashlib.sha256()
        digest.update(f"{self.gear_config.inference_max_doc_length}|{len(self.tokenizer)}|".encode())
        digest.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        for name, tensor in self.doc_encoder.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _encode(self, texts, batch_size, max_length, encoder) -> np.ndarray:
        self.eval()
        out = [np.zeros((0, self.query_encoder.config.hidden_size), dtype=np.float32)]
        for i in range(0, len(texts), batch_size):
            batch = self._tokenize(texts[i : i + batch_size], max_length).to(self.device)
            emb = self.embed_queries(batch["input_ids"], batch["attention_mask"], encoder=encoder)
            out.append(emb.cpu().numpy().astype(np.float32))
        return np.concatenate(out)

    def _word_token_mask(self, ids: list[int]) -> np.ndarray:
        """False for special tokens ([CLS], [SEP], [PAD], [DEC]), True for the query's words."""
        special = set(self.tokenizer.all_special_ids)
        return np.array([t not in special for t in ids], dtype=bool)

    @torch.no_grad()
    def _fuse_one(self, query: str, document: str, return_layer: int | None = None):
        self.eval()
        q = self._tokenize([query], self.gear_config.max_query_length).to(self.device)
        d = self._tokenize(
            [document], self.gear_config.inference_max_doc_length, return_offsets_mapping=True
        ).to(self.device)
        d_states = self.doc_states(d["input_ids"], d["attention_mask"])
        fused, weights = self.fuse(q["input_ids"], q["attention_mask"], d_states, d["attention_mask"], return_layer)
        return q, d, fused, weights

    @torch.no_grad()
    def cross_attention(self, query: str, document: str, layer: int | None = None) -> CrossAttention:
        """Cross-attention weights of one fusion layer from the query's tokens to the document's.

        ``layer`` is 1-based like the paper ("layer 10 of 12"); None = the
        config's ``localize_layer`` or n_layers - 2. The document is truncated
        to ``inference_max_doc_length`` tokens. Returns ``CrossAttention``
        (a tuple: weights (heads, Lq, Ld), offsets (Ld, 2), query_mask (Lq,)).
        """
        layer = self.resolve_layer(layer)
        with eager_attention(self.query_encoder.config):
            q, d, _, weights = self._fuse_one(query, document, return_layer=layer)
        query_mask = self._word_token_mask(q["input_ids"][0].tolist())
        return CrossAttention(
            weights=weights[0].float().cpu().numpy(),
            offsets=d["offset_mapping"][0].cpu().numpy().astype(np.int64),
            query_mask=query_mask,
        )

    @torch.no_grad()
    def doc_token_weights(
        self, queries: Sequence[str], document: str, layer: int | None = None, all_layers: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """How each query's attention spreads over the document's tokens, with
        the document encoded once: the cross-attention weights of a fusion
        layer averaged over heads, then over the query's word tokens.

        Returns (weights, offsets): weights (n_queries, doc_tokens), or
        (n_queries, n_layers, doc_tokens) with ``all_layers`` (index 0 =
        layer 1); each row sums to 1 over the document's tokens, [CLS] and
        [SEP] included. offsets (doc_tokens, 2) as in ``CrossAttention``.
        """
        self.eval()
        n = len(queries)
        q = self._tokenize(queries, self.gear_config.max_query_length).to(self.device)
        d = self._tokenize([document], self.gear_config.inference_max_doc_length, return_offsets_mapping=True).to(self.device)
        d_states = self.doc_states(d["input_ids"], d["attention_mask"])
        return_layer = 0 if all_layers else self.resolve_layer(layer)
        with eager_attention(self.query_encoder.config):
            _, weights = self.fuse(
                q["input_ids"], q["attention_mask"], d_states.expand(n, -1, -1), d["attention_mask"].expand(n, -1),
                return_layer,
            )
        if not all_layers:
            weights = weights[None]
        per_query_token = weights.float().mean(2)  # (layers, n, Lq, Ld)
        words = self.query_word_mask(q["input_ids"]).float()
        empty = words.sum(1) == 0  # a query of special tokens only: every real token counts
        words[empty] = q["attention_mask"][empty].float()
        per_doc = (per_query_token * words[None, :, :, None]).sum(2) / words.sum(1)[None, :, None]
        per_doc = per_doc.permute(1, 0, 2).cpu().numpy()  # (n, layers, Ld)
        offsets = d["offset_mapping"][0].cpu().numpy().astype(np.int64)
        return (per_doc if all_layers else per_doc[:, 0]), offsets

    @torch.no_grad()
    def localize_many(
        self,
        queries: Sequence[str],
        document: str,
        sentence_spans: Sequence[tuple[int, int]] | Sequence[dict[str, int]],
        layer: int | None = None,
        pooling: str = "sum",
        all_layers: bool = False,
    ) -> np.ndarray:
        """``localize`` for several queries of one document, which is encoded
        once: (n_queries, n_sentences), or (n_queries, n_layers, n_sentences)
        with ``all_layers`` (layer index 0 = layer 1)."""
        weights, offsets = self.doc_token_weights(queries, document, layer, all_layers)
        return pool_sentences(weights, sentence_membership(offsets, sentence_spans), pooling)

    @torch.no_grad()
    def localize(
        self,
        query: str,
        document: str,
        sentence_spans: Sequence[tuple[int, int]] | Sequence[dict[str, int]],
        layer: int | None = None,
        pooling: str = "sum",
    ) -> np.ndarray:
        """One score per sentence (higher = more relevant), paper section 3.5.

        Pooling: the chosen fusion layer's cross-attention weights are averaged
        over heads and over the query's word tokens ([CLS]/[SEP] excluded),
        giving one weight per document token (a distribution over the
        document); a sentence's score is the sum of the weights of the document
        tokens that start inside its character span [start, end). A summed
        score is the attention mass the query puts on that sentence.
        ``pooling="mean"`` divides it by the sentence's token count (mass per
        token), which removes the advantage long sentences have while the
        attention is still diffuse. Sentences past the truncation limit score 0. ``layer`` as in ``cross_attention``.
        Spans are (start, end) pairs or {"start", "end"} dicts (the triples' SPAN).
        """
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', not {pooling!r}")
        return sentence_scores_from_attention(self.cross_attention(query, document, layer), sentence_spans, pooling)

    @torch.no_grad()
    def generate(self, query: str, document: str, max_new_tokens: int = 48, num_beams: int = DEFAULT_NUM_BEAMS,
                 no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM) -> str:
        """The unit decoded from the fusion states of (query, document) (see ``decode``)."""
        return self.generate_many([query], [document], max_new_tokens, num_beams, no_repeat_ngram_size)[0]

    @torch.no_grad()
    def generate_many(self, queries: Sequence[str], documents: Sequence[str], max_new_tokens: int = 48,
                      num_beams: int = DEFAULT_NUM_BEAMS, no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM,
                      batch_size: int = GENERATION_BATCH) -> list[str]:
        """``generate`` for each (query, document) pair, decoded ``batch_size``
        pairs at a time: each pair is fused alone, and the fused states are
        padded (masked) into one beam search, whose per-step cost barely grows
        with the batch on CPU."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        out: list[str] = []
        for first in range(0, len(queries), batch_size):
            states, masks, ids = [], [], []
            for query, document in zip(queries[first:first + batch_size], documents[first:first + batch_size]):
                q, _, fused, _ = self._fuse_one(query, document)
                states.append(fused[0])
                masks.append(q["attention_mask"][0])
                ids.append(q["input_ids"][0])
            fused = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
            mask = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)
            q_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.tokenizer.pad_token_id)
            out += self.decode(fused, mask, max_new_tokens, num_beams, no_repeat_ngram_size, q_ids=q_ids)
        return out

    @torch.no_grad()
    def decode(self, fused: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int = 48,
               num_beams: int = DEFAULT_NUM_BEAMS, no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM,
               q_ids: torch.Tensor | None = None) -> list[str]:
        """One unit per row of fused states (B, Lq, H), by beam search
        (``q_ids``: the query's token ids, for a decoder that copies from them).

        A unit is one sentence, so decoding stops at [SEP] or at the first
        sentence-final token (``sentence_end_ids``); ``no_repeat_ngram_size``
        blocks the loops a small decoder falls into ("rand promoted, rand
        promoted"). BLIP decodes with 3 beams; 1 is greedy.
        """
        start = torch.full((fused.shape[0], 1), self.dec_token_id, device=self.device)
        # A plain generate() with encoder_hidden_states fails in transformers 5
        # ('DynamicCache' has no 'is_updated'); an encoder-decoder cache works.
        out = self.decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=fused,
            encoder_attention_mask=query_mask.expand(fused.shape[0], -1),
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=[self.tokenizer.sep_token_id, *self.sentence_end_ids],
            pad_token_id=self.tokenizer.pad_token_id,
            **{k: v.expand(fused.shape[0], -1) for k, v in self.copy_sources(q_ids).items()},
        )
        return [self.tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in out]

    @property
    def sentence_end_ids(self) -> list[int]:
        """Vocabulary ids of the tokens that end a sentence (".", "!", "?")."""
        ids = self.tokenizer.convert_tokens_to_ids(list(SENTENCE_END_TOKENS))
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]
