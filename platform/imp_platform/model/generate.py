"""Caption generation with the text decoder: batched greedy and beam search with a key/value cache.

Inputs are raw model inputs, as ``imp_platform.train.tasks.to_inputs`` makes them; the
encoder runs once per batch, then every sequence grows one token per step. With the cache
each step feeds only the newest token (keys/values of the earlier ones are kept); without
it each step re-runs the whole prefix, which gives the same tokens and is the baseline
``bench caption`` measures the cache against. Greedy is beam search with one beam.
"""

from __future__ import annotations

from typing import Any

import torch

from imp_platform.model.decoder import DecoderCache

PAD_ID = 0  # the tokenizers' [PAD] (data.dataset.SPECIAL_TOKENS)


@torch.no_grad()
def generate(
    model: Any,
    modality: str,
    inputs: torch.Tensor,
    *,
    max_len: int,
    beam_size: int = 1,
    eos_id: int | None = None,
    bos_id: int | None = None,
    use_cache: bool = True,
    **encode_kwargs: Any,
) -> torch.Tensor:
    """Caption token ids ``[B, max_len]`` (long) for one batch of ``modality`` inputs.

    ``eos_id``/``bos_id`` default to the decoder's reserved ids (``model.decoder.eos_id``/``bos_id``).
    Each row holds the tokens before EOS, then 0 (the tokenizer's [PAD]). ``beam_size`` 1 is
    greedy; beams rank by summed log-probability. ``encode_kwargs`` go to ``model.encode``
    (e.g. ``mask`` for text).
    """
    if model.decoder is None:
        raise ValueError("the model has no text decoder (model.decoder.enabled is false)")
    return generate_from(model, model.encode(modality, inputs, **encode_kwargs), max_len=max_len,
                         beam_size=beam_size, eos_id=eos_id, bos_id=bos_id, use_cache=use_cache)


@torch.no_grad()
def generate_from(
    model: Any,
    encoded: Any,
    *,
    max_len: int,
    beam_size: int = 1,
    eos_id: int | None = None,
    bos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """``generate`` from an ``EncoderOutput`` the caller already has (e.g. to also score the batch)."""
    decoder = model.decoder
    if decoder is None:
        raise ValueError("the model has no text decoder (model.decoder.enabled is false)")
    if not 1 <= max_len < decoder.max_len:
        raise ValueError(f"max_len must be in [1, {decoder.max_len - 1}] (the model's max_text_len), got {max_len}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    bos = decoder.bos_id if bos_id is None else bos_id
    eos = decoder.eos_id if eos_id is None else eos_id
    context, mask = model.decoder_context(encoded)
    batch, beams = context.shape[0], beam_size
    context = context.repeat_interleave(beams, dim=0)
    mask = None if mask is None else mask.repeat_interleave(beams, dim=0)
    cache = DecoderCache() if use_cache else None

    seqs = torch.full((batch * beams, 1), bos, dtype=torch.long, device=context.device)
    scores = torch.full((batch, beams), float("-inf"), device=context.device)
    scores[:, 0] = 0.0  # all beams start identical: keep one until they diverge
    done = torch.zeros(batch * beams, dtype=torch.bool, device=context.device)
    for _ in range(max_len):
        step_ids = seqs[:, -1:] if use_cache else seqs
        logits = decoder(step_ids, context, mask, cache).logits[:, -1].float()
        logits[:, [bos, PAD_ID]] = float("-inf")  # never generated; PAD only fills finished rows
        logp = logits.log_softmax(dim=-1)
        logp[done] = float("-inf")  # a finished beam extends with PAD at no cost
        logp[done, PAD_ID] = 0.0
        vocab = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, beams * vocab)
        scores, flat = total.topk(beams, dim=-1)
        parent = (flat // vocab + torch.arange(batch, device=flat.device)[:, None] * beams).reshape(-1)
        token = (flat % vocab).reshape(-1)
        seqs = torch.cat([seqs[parent], token[:, None]], dim=1)
        done = done[parent] | (token == eos)
        if cache is not None and beams > 1:  # greedy rows never change parent
            cache.reorder(parent)
        if bool(done.all()):
            break
    best = scores.argmax(dim=-1) + torch.arange(batch, device=scores.device) * beams
    out = seqs[best, 1:]
    out = out.masked_fill(out.eq(eos).cumsum(dim=1) > 0, PAD_ID)  # EOS and all after it -> PAD
    return torch.nn.functional.pad(out, (0, max_len - out.shape[1]), value=PAD_ID)


def ids_to_text(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    """Generated ids ``[B, L]`` -> one string per row, with the dataset's ``tokenizers.Tokenizer``
    (load it with ``load_tokenizer(read_tokenizer(cfg, split))``, as eval does); pad ids are dropped."""
    return [tokenizer.decode([i for i in row if i != PAD_ID]) for row in ids.tolist()]
