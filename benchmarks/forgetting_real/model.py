"""The model with a frozen prefix: the first FROZEN decoder layers never change in any method, so
their output is computed once per token sequence and every training step and evaluation runs only
the last layers (and the head, only where a loss or a choice is read).

Right padding with causal attention: a real token only attends to earlier (real) tokens, so padded
batches need no attention mask and give the same values as unpadded ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm(model):
    """The LlamaForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    return causal_lm(model).model


def layer_params(model, start: int) -> list[torch.nn.Parameter]:
    """The nn.Linear weights of decoder layers start.. (the tuned block; norms stay frozen)."""
    out = []
    for layer in decoder(model).layers[start:]:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                out.append(m.weight)
    return out


def tuned_names(model, start: int) -> list[str]:
    """Checkpoint names of the tuned matrices (model.layers.N.<...>.weight)."""
    n = len(decoder(model).layers)
    names = []
    for i in range(start, n):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names.append(f"model.layers.{i}.{sub}.weight")
    return names


def _rope_mask(dec, h):
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(h.shape[1]).unsqueeze(0)
    pe = dec.rotary_emb(h, position_ids=pos)
    # config, inputs_embeds, attention_mask, cache: positional, since transformers renamed the fourth
    # (past_key_values up to 5.23, cache from 5.24) and the supported range spans both.
    mask = create_causal_mask(dec.config, h, None, None, position_ids=pos)
    return pos, pe, mask


@torch.no_grad()
def prefix(model, ids: torch.Tensor, frozen: int, batch: int = 64) -> torch.Tensor:
    """Hidden states after the first `frozen` layers for right-padded token ids (N, T)."""
    dec = decoder(model)
    outs = []
    for s in range(0, ids.shape[0], batch):
        h = dec.embed_tokens(ids[s:s + batch])
        pos, pe, mask = _rope_mask(dec, h)
        for layer in dec.layers[:frozen]:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        outs.append(h)
    return torch.cat(outs)


def suffix(model, h: torch.Tensor, frozen: int) -> torch.Tensor:
    """Final-norm hidden states from prefix states `h` through layers frozen.. ."""
    dec = decoder(model)
    pos, pe, mask = _rope_mask(dec, h)
    for layer in dec.layers[frozen:]:
        h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    return dec.norm(h)


def head(model, h: torch.Tensor) -> torch.Tensor:
    return causal_lm(model).lm_head(h)


class Batch:
    """Right-padded sequences with the positions whose next token is scored.

    `ids` (N, T); `targets`: list per sequence of (position, token) pairs: the logits at `position`
    should predict `token`.
    """

    def __init__(self, seqs: list[list[int]], targets: list[list[tuple[int, int]]], pad: int):
        T = max(len(s) for s in seqs)
        self.ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            self.ids[i, :len(s)] = torch.tensor(s)
        self.targets = targets
        self.h = None  # prefix states, filled by `encode`

    def encode(self, model, frozen: int):
        self.h = prefix(model, self.ids, frozen)
        return self

    def select(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """(prefix states, row index, position index, target tokens) for the sequences `idx`."""
        idx = list(idx)
        h = self.h[idx]
        # trim padding columns beyond the longest selected sequence
        T = max(max(p for p, _ in self.targets[i]) for i in idx) + 1
        rows, cols, toks = [], [], []
        for r, i in enumerate(idx):
            for p, t in self.targets[i]:
                rows.append(r)
                cols.append(p)
                toks.append(t)
        return h[:, :T], torch.tensor(rows), torch.tensor(cols), torch.tensor(toks)


def target_logits(model, batch: Batch, idx, frozen: int):
    h, rows, cols, toks = batch.select(idx)
    out = suffix(model, h, frozen)
    return head(model, out[rows, cols]), rows, toks


def loss_on(model, batch: Batch, idx, frozen: int) -> torch.Tensor:
    logits, _, toks = target_logits(model, batch, idx, frozen)
    return F.cross_entropy(logits.float(), toks)
