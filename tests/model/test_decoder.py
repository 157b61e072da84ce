"""CoCa pieces: causal decoder, attentional pooler, cached vs uncached generation."""

from __future__ import annotations

import pytest
import torch

from imp_platform.config.model import ModelConfig
from imp_platform.model import build_model
from imp_platform.model.decoder import DecoderCache
from imp_platform.model.generate import PAD_ID, generate, ids_to_text
from imp_platform.model.presets import preset

VIDEO = (4, 16, 16, 3)  # 2 x 2 x 2 tubelets of the tiny preset


def coca(pooling: str = "attention", **decoder: object) -> ModelConfig:
    data = preset("tiny").model_dump()
    data.update(pooling=pooling, decoder={"enabled": True, "num_queries": 3, **decoder})
    return ModelConfig(**data)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(coca()).eval()


def test_decoder_is_off_by_default_so_encoder_checkpoints_are_unchanged() -> None:
    plain = build_model(preset("tiny"))
    assert plain.decoder is None and plain.pooler is None
    assert not any(k.startswith(("decoder.", "pooler.")) for k in plain.state_dict())


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_logits_at_t_ignore_later_tokens(pooling: str) -> None:
    torch.manual_seed(0)
    m = build_model(coca(pooling)).eval()
    context, mask = m.decoder_context(m.encode("video", torch.rand(2, *VIDEO)))
    ids = torch.randint(2, 30, (2, 9))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(2, 30, (2, 4))
    a, b = m.decoder(ids, context, mask).logits, m.decoder(changed, context, mask).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_cross_attention_ignores_padded_context_tokens() -> None:
    """Mean pooling on text: the decoder cross-attends to the encoder tokens, padding masked."""
    torch.manual_seed(0)
    m = build_model(coca("mean")).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = ids != 0
    other = ids.clone()
    other[0, 3:] = torch.tensor([11, 12])  # junk under the padding of row 0
    dec = torch.randint(2, 30, (2, 4))
    outs = [m.decoder(dec, *m.decoder_context(m.encode("text", x, mask=mask))).logits for x in (ids, other)]
    torch.testing.assert_close(outs[0][0], outs[1][0])


def test_unimodal_text_embedding_ignores_the_clip_and_the_padding(model: torch.nn.Module) -> None:
    """The last real token of the unimodal layers embeds the caption alone (CoCa's text embedding)."""
    ids = torch.tensor([[7, 8, 9, 0], [7, 8, 9, 10]])
    lengths = torch.tensor([3, 3])
    junk = ids.clone()
    junk[1, 3] = 11  # beyond the last real token
    embeddings = []
    for tokens in (ids, junk):
        context, mask = model.decoder_context(model.encode("video", torch.rand(2, *VIDEO)))  # a new clip each time
        embeddings.append(model.decoder.text_embedding(model.decoder(tokens, context, mask), lengths))
    assert embeddings[0].shape == (2, 96)
    torch.testing.assert_close(embeddings[0], embeddings[1])
    torch.testing.assert_close(embeddings[0][0], embeddings[0][1])


def test_attention_pooler_shapes_and_masking(model: torch.nn.Module) -> None:
    out = model.encode("video", torch.rand(3, *VIDEO))
    assert out.pooled.shape == (3, 96) and out.queries is not None and out.queries.shape == (3, 3, 96)
    assert model.decoder_context(out) == (out.queries, None)
    # Only one query when there is no decoder.
    data = preset("tiny").model_dump()
    data["pooling"] = "attention"
    encoder_only = build_model(ModelConfig(**data)).eval()
    alone = encoder_only.encode("video", torch.rand(2, *VIDEO))
    assert alone.pooled.shape == (2, 96) and alone.queries is None
    # Text with padding (pooled by the encoder without a decoder): what sits under the mask must
    # not change the pooled outputs.
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8]])
    mask = ids != 0
    junk = ids.clone()
    junk[0, 2:] = torch.tensor([9, 10])
    a, b = encoder_only.encode("text", ids, mask=mask), encoder_only.encode("text", junk, mask=mask)
    torch.testing.assert_close(a.pooled[0], b.pooled[0])


def test_cached_step_by_step_logits_equal_one_full_pass(model: torch.nn.Module) -> None:
    context, mask = model.decoder_context(model.encode("video", torch.rand(2, *VIDEO)))
    ids = torch.randint(2, 30, (2, 6))
    full = model.decoder(ids, context, mask).logits
    cache = DecoderCache()
    steps = [model.decoder(ids[:, t:t + 1], context, mask, cache).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_uncached(model: torch.nn.Module, beam_size: int) -> None:
    clips = torch.rand(4, *VIDEO)
    cached = generate(model, "video", clips, max_len=7, beam_size=beam_size)
    plain = generate(model, "video", clips, max_len=7, beam_size=beam_size, use_cache=False)
    assert cached.shape == (4, 7) and cached.dtype == torch.long
    assert torch.equal(cached, plain)


def test_generation_stops_at_eos_and_pads(model: torch.nn.Module) -> None:
    """Declaring a token greedy emits as EOS cuts each row at its first occurrence, PAD after."""
    clips = torch.rand(3, *VIDEO)
    free = generate(model, "video", clips, max_len=6, eos_id=-1)  # an id never produced: no stop
    eos = int(free[0, 2])
    stopped = generate(model, "video", clips, max_len=6, eos_id=eos)
    for row, out in zip(free.tolist(), stopped.tolist(), strict=True):
        cut = row.index(eos) if eos in row else len(row)
        assert out == row[:cut] + [PAD_ID] * (len(row) - cut)
    assert model.decoder.bos_id not in free and PAD_ID not in free


def test_beam_search_scores_no_worse_than_greedy(model: torch.nn.Module) -> None:
    clips = torch.rand(3, *VIDEO)
    context, _ = model.decoder_context(model.encode("video", clips))

    def logprob(seq: torch.Tensor) -> torch.Tensor:
        bos = torch.full((seq.shape[0], 1), model.decoder.bos_id)
        inputs = torch.cat([bos, seq], dim=1)[:, :-1]
        logits = model.decoder(inputs, context).logits.float()
        logits[..., [model.decoder.bos_id, PAD_ID]] = float("-inf")
        return logits.log_softmax(-1).gather(-1, seq[..., None]).squeeze(-1).sum(-1)

    greedy = generate(model, "video", clips, max_len=4, beam_size=1, eos_id=-1)
    beam = generate(model, "video", clips, max_len=4, beam_size=4, eos_id=-1)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


def test_ids_to_text_drops_padding() -> None:
    from imp_platform.data.synth import build_tokenizer

    tokenizer = build_tokenizer()
    row = tokenizer.encode("a seven moves left").ids
    ids = torch.tensor([row + [PAD_ID] * 2, row[:2] + [PAD_ID] * 4])
    assert ids_to_text(ids, tokenizer) == ["a seven moves left", "a seven"]


def test_generate_rejects_a_model_without_decoder() -> None:
    with pytest.raises(ValueError, match="no text decoder"):
        generate(build_model(preset("tiny")), "video", torch.rand(1, *VIDEO), max_len=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
def test_xformers_causal_and_cross_attention_match_sdpa() -> None:
    from imp_platform.model.attention import attention, xformers_available

    if not xformers_available():
        pytest.skip("xformers is not importable")
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, n, 2, 16, device="cuda") for n in (6, 6, 6))
    for nq in (6, 1):  # full causal pass, then one cached decoding step
        want = attention(q[:, -nq:], k, v, backend="sdpa", causal=True)
        torch.testing.assert_close(attention(q[:, -nq:], k, v, backend="xformers", causal=True), want,
                                   atol=2e-3, rtol=2e-3)
    ctx_k, ctx_v = torch.randn(3, 9, 2, 16, device="cuda"), torch.randn(3, 9, 2, 16, device="cuda")
    mask = torch.arange(9, device="cuda")[None] < torch.tensor([[9], [4], [1]], device="cuda")
    want = attention(q, ctx_k, ctx_v, mask=mask, backend="sdpa", cross=True)
    torch.testing.assert_close(attention(q, ctx_k, ctx_v, mask=mask, backend="xformers", cross=True), want,
                               atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_a_tiny_captioner_learns_to_name_what_it_sees() -> None:
    """Images of 10 noisy prototypes captioned [2, class + 3, 20]: the decoder must read the encoder
    to get the middle word right (chance: 0.1). Grounding works; moving digits are `bench caption`."""
    from imp_platform.objectives import caption_loss

    torch.manual_seed(0)
    data = preset("tiny").model_dump()
    data.update(decoder={"enabled": True}, vision_stem="linear")
    m = build_model(ModelConfig(**data))
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    prototypes = torch.rand(10, 16, 16, 3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        label = torch.randint(0, 10, (n,))
        images = (prototypes[label] + 0.3 * torch.rand(n, 16, 16, 3)).clamp(0, 1)
        return images, torch.stack([torch.full_like(label, 2), label + 3, torch.full_like(label, 20)], 1), label

    for _ in range(120):
        images, ids, _ = batch(32)
        logits = m.caption_logits(m.encode("image", images), ids)
        loss = caption_loss(logits, ids, torch.ones_like(ids, dtype=torch.bool), m.decoder.eos_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, _, label = batch(200)
    generated = generate(m.eval(), "image", images, max_len=4)
    assert (generated[:, 1] == label + 3).float().mean() >= 0.9
    assert (generated[:, 0] == 2).all() and (generated[:, 2] == 20).all()
