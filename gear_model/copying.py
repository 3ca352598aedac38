"""A decoder that can copy the query's words (not in the paper).

A pointer-generator head (See et al., 2017, "Get To The Point") on the BERT
LM-head decoder: at every step a gate ``g`` mixes the vocabulary softmax with
a copy distribution, an attention of the decoder state over the fusion states
of the query's word tokens, scattered onto those tokens' vocabulary ids:

    p(w) = (1 - g) * p_vocab(w) + g * sum_{j: query_j = w} a_j

An RIR query is a rewrite of its unit, so most of the unit's words are in the
query; a decoder trained from scratch on a few hundred units rarely learns to
reproduce rare words through a 30k-word softmax, and copying gives it those
words directly. ``forward`` returns ``log p`` as its logits, which
``log_softmax`` leaves unchanged, so the cross-entropy of the LM loss and
``generate``'s beam search read them as they read plain logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertLMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

# Names of the copy head's parameters under the decoder (none is in a BERT checkpoint).
COPY_PARAMETER_PREFIXES = ("copy_query.", "copy_gate.")


class QueryCopyingLMHeadModel(BertLMHeadModel):
    """``BertLMHeadModel`` with a pointer-generator head over the query's tokens.

    ``forward`` takes ``copy_source_ids`` (B, Lq), the query's token ids
    aligned with ``encoder_hidden_states``, and ``copy_source_mask`` (B, Lq),
    True on the tokens that may be copied (the query's words, not special
    tokens or padding). Without them it is the plain LM head.
    """

    def __init__(self, config):
        super().__init__(config)
        hidden = config.hidden_size
        self.copy_query = nn.Linear(hidden, hidden)
        self.copy_gate = nn.Linear(hidden, 1)
        for layer in (self.copy_query, self.copy_gate):
            nn.init.normal_(layer.weight, std=config.initializer_range)
            nn.init.zeros_(layer.bias)

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, use_cache=None, logits_to_keep=0, copy_source_ids=None, copy_source_mask=None,
                **kwargs):
        kwargs.pop("return_dict", None)  # generate() passes it; the output is always a ModelOutput
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.cls(hidden)
        if copy_source_ids is not None:
            logits = self.mix_in_copying(hidden, logits, encoder_hidden_states, copy_source_ids, copy_source_mask)
        return CausalLMOutputWithCrossAttentions(logits=logits, past_key_values=outputs.past_key_values)

    def mix_in_copying(self, hidden: torch.Tensor, logits: torch.Tensor, memory: torch.Tensor,
                       source_ids: torch.Tensor, source_mask: torch.Tensor | None) -> torch.Tensor:
        """log p of the pointer-generator mixture, (B, T, V) float32."""
        if source_mask is None:
            source_mask = torch.ones_like(source_ids, dtype=torch.bool)
        source_mask = source_mask.bool()
        # In float32 even under bf16 autocast: the mixture is a sum of probabilities.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden, memory = hidden.float(), memory.float()
            query = nn.functional.linear(hidden, self.copy_query.weight.float(), self.copy_query.bias.float())
            scores = query @ memory.transpose(1, 2) / math.sqrt(hidden.shape[-1])
            # A large finite fill keeps a query without words from making NaNs; its gate is zeroed below.
            attention = scores.masked_fill(~source_mask[:, None, :], -1e4).softmax(-1)
            copy = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_add_(
                -1, source_ids[:, None, :].expand(-1, hidden.shape[1], -1), attention)
            gate_logit = nn.functional.linear(hidden, self.copy_gate.weight.float(), self.copy_gate.bias.float())
            gate = torch.sigmoid(gate_logit) * source_mask.any(-1)[:, None, None]
            mixed = (1 - gate) * logits.float().softmax(-1) + gate * copy
            return mixed.clamp_min(1e-12).log()
