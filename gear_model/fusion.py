"""The fusion encoder: E_q's own layers with a cross-attention block added.

Stock ``BertLayer`` only accepts cross-attention in a decoder, and a decoder's
self-attention is causal. So the fusion encoder owns only its new parts, one
``BertAttention(is_cross_attention=True)`` per layer, and borrows E_q's layers
at call time: per layer, E_q's (bidirectional) self-attention, then the new
cross-attention over E_d's token states, then E_q's feed-forward. E_q is not
registered as a submodule here, so its weights appear once in the state dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertAttention


class FusionEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        # The config object is E_q's own, so switching E_q to eager attention
        # switches these blocks too.
        self.config = config
        self.cross = nn.ModuleList(
            BertAttention(config, is_cross_attention=True, layer_idx=i) for i in range(config.num_hidden_layers)
        )
        self.apply(self._init_bert)

    def _init_bert(self, module: nn.Module) -> None:
        # BERT's initialisation, for blocks that the checkpoint does not have.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        query_encoder: BertModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        doc_states: torch.Tensor,
        doc_mask: torch.Tensor,
        return_layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused query states (B, Lq, H), and the cross-attention weights
        (B, heads, Lq, Ld) of ``return_layer`` (1-based) when asked, or of
        every layer stacked (layers, B, heads, Lq, Ld) for ``return_layer=0``;
        they are only available under eager attention (see ``eager_attention``)."""
        cfg = query_encoder.config
        hidden = query_encoder.embeddings(input_ids=input_ids)
        self_mask = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=attention_mask)
        cross_mask = create_bidirectional_mask(
            config=cfg, inputs_embeds=hidden, attention_mask=doc_mask, encoder_hidden_states=doc_states
        )
        weights, every = None, []
        for i, (layer, cross) in enumerate(zip(query_encoder.encoder.layer, self.cross, strict=True)):
            h, _ = layer.attention(hidden, self_mask)
            h, w = cross(h, encoder_hidden_states=doc_states, encoder_attention_mask=cross_mask)
            hidden = layer.feed_forward_chunk(h)
            if return_layer == i + 1:
                weights = w
            elif return_layer == 0:
                every.append(w)
        if return_layer == 0:
            weights = torch.stack(every) if all(w is not None for w in every) else None
        return hidden, weights


@contextlib.contextmanager
def eager_attention(config: BertConfig) -> Iterator[None]:
    """Use eager attention inside the block (SDPA returns no weights).

    Changes shared config state, so it is not thread-safe.
    """
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous
