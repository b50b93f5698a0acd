"""Batched sampling: cache == no cache, EOS handling, sampling filters, reproducibility, masks, and
the step decoder against the loop it replaced."""

import pytest
import torch

from palmrl.errors import UserError
from palmrl.generate import Decoder, Generation, draw, generate, generate_responses, left_pad, sample_next
from palmrl.model import ModelConfig, PaLM

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def tiny_model(**overrides) -> PaLM:
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(vocab_size=50, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=40),
                            **overrides})
    return PaLM(config)


def lora_model() -> PaLM:
    from palmrl.model.lora import LoRAConfig, add_lora

    model = tiny_model(kv_heads=2).eval()
    add_lora(model, "actor", LoRAConfig(rank=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a live update (B starts at 0)
    return model


def one_step_logits(model: PaLM, cache) -> torch.Tensor:
    """The prompts through `cache`, then one token per row: that step's logits (3, 1, V)."""
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    model(tokens, attention_mask=mask, cache=cache, last_only=True)
    return model(torch.tensor([[3], [4], [5]]), cache=cache, last_only=True)


def test_cpu_decoding_steps_use_weight_copies_with_the_same_logits():
    """A CPU cache multiplies one-token steps by (in, out) weight copies, LoRA updates included: the
    logits match F.linear's path to float rounding; fp16 copies to fp16 rounding of the weights; a
    meta-device cache (as for a GPU) keeps F.linear."""
    from palmrl.model.lora import lora_scope

    model = lora_model()
    with torch.no_grad(), lora_scope(model, "actor"):
        logits = {}
        for weights in ("fp32", "fp16", None):
            cache = model.new_cache(3, 12, weights=weights or "fp32")
            assert cache.weights == (weights or "fp32")
            cache.weights = weights
            logits[weights] = one_step_logits(model, cache)
            assert len(cache._copies) == (2 * 3 + 1 if weights else 0)  # 3 matrices a layer + the output
    assert torch.allclose(logits["fp32"], logits[None], atol=1e-5, rtol=1e-5)
    fp16_error = (logits["fp16"] - logits[None]).abs().max().item()
    assert 1e-6 < fp16_error < 2e-2 * logits[None].abs().max().item()  # rounded weights, not fp32's product
    assert model.new_cache(1, 4, device="meta").weights is None
    with pytest.raises(UserError, match="decode_weights must be one of fp32, fp16, got 'int8'"):
        model.new_cache(1, 4, weights="int8")


def test_batched_fp32_steps_multiply_by_mkl_packed_weights(monkeypatch):
    """Several rows: fp32 copies are MKL's packed matrices for that many rows (its plain product packs
    again at every call), with the (in, out) copy's logits to float rounding; one row keeps the
    (in, out) copy."""
    from palmrl.model import palm

    if not palm._mkl_packing_works():
        pytest.skip("this PyTorch build has no MKL packed fp32 product")
    model = lora_model()
    with torch.no_grad():
        cache = model.new_cache(3, 12)
        packed = one_step_logits(model, cache)
        assert {stamp[2] for stamp in cache._copies.values()} == {3}  # all 7 matrices packed for 3 rows

        one_row = model.new_cache(1, 12)
        model(torch.tensor([[5, 6]]), cache=one_row, last_only=True)
        model(torch.tensor([[7]]), cache=one_row, last_only=True)
        assert {stamp[2] for stamp in one_row._copies.values()} == {0}  # (in, out) copies

        monkeypatch.setattr(palm, "_mkl_packing_works", lambda: False)  # a build without MKL
        plain_cache = model.new_cache(3, 12)
        plain = one_step_logits(model, plain_cache)
        assert {stamp[2] for stamp in plain_cache._copies.values()} == {0}
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_a_serving_model_keeps_its_decode_copies_until_a_weight_changes():
    """keep_decode_copies (sample, serve, palmrl.LLM): the second loop makes no copies; a weight written
    in place is copied again, so the logits follow it."""
    model = lora_model().keep_decode_copies()
    with torch.no_grad():
        for weights in ("fp32", "fp16"):
            one_step_logits(model, model.new_cache(3, 12, weights=weights))
        made = dict(model.decode_copies)  # fp32 at 3 rows: MKL-packed (one per weight, as the fp16 ones)
        assert len(made) == 2 * (2 * 3 + 1)
        one_step_logits(model, model.new_cache(3, 12))
        assert all(model.decode_copies[k][-1] is made[k][-1] for k in made)  # the same objects: nothing remade

        model.layers[0].attn_out.weight.mul_(2.0)
        kept = one_step_logits(model, model.new_cache(3, 12))
        fresh = model.new_cache(3, 12)
        fresh.weights = None  # F.linear on the current weights
        torch.testing.assert_close(kept, one_step_logits(model, fresh), atol=1e-5, rtol=1e-5)
        key = ("fp32", id(model.layers[0].attn_out.weight))
        assert model.decode_copies[key][-1] is not made[key][-1]


def test_fp16_decoding_samples_what_fp32_does_when_the_choice_is_clear():
    """Greedy decoding with fp16 weight copies picks fp32's tokens unless two logits are within fp16
    rounding: on this seed every step agrees; a bf16 model's activations go through them too."""
    model = tiny_model()
    a = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    b = generate(model, PROMPTS, max_new_tokens=12, temperature=0, decode_weights="fp16")
    assert torch.equal(a.sequences, b.sequences)
    c = generate(model.to(torch.bfloat16), PROMPTS, max_new_tokens=4, temperature=0, decode_weights="fp16")
    assert c.sequences.shape == (3, 5 + 4)


def test_bf16_weights_decode_through_the_layers_and_fp32_ones_through_copies():
    """On the CPU fp32 weights are multiplied through contiguous (in, out) copies; bf16 weights through
    the layers (a copy was slower for oneDNN's bf16 product and cost ~5 ms a matrix to make), unless
    fp16 copies are asked for."""
    model = tiny_model()
    assert model.new_cache(3, 8).weights == "fp32"
    assert model.to(torch.bfloat16).new_cache(3, 8).weights is None
    assert model.new_cache(3, 8, weights="fp16").weights == "fp16"
    out = generate(model, PROMPTS, max_new_tokens=3, temperature=0)
    assert out.sequences.shape == (3, 5 + 3)


def test_left_pad():
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    assert tokens.tolist()[1] == [0, 0, 0, 11, 12]
    assert mask.tolist()[1] == [False, False, False, True, True]
    with pytest.raises(UserError, match="prompt 1"):
        left_pad([[1], []], pad_id=0)


@pytest.mark.parametrize("overrides", [{}, dict(kv_heads=2, xpos=True, qk_norm=True)])
def test_greedy_cache_equals_no_cache(overrides):
    model = tiny_model(**overrides)
    a = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    b = generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.attention_mask, b.attention_mask)


def test_sampling_cache_equals_no_cache_and_is_reproducible():
    model = tiny_model()
    runs = [generate(model, PROMPTS, max_new_tokens=10, top_k=10,
                     generator=torch.Generator().manual_seed(3), use_cache=use_cache)
            for use_cache in (True, True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].sequences, runs[2].sequences)
    other = generate(model, PROMPTS, max_new_tokens=10, top_k=10, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(runs[0].sequences, other.sequences)


def test_greedy_continuation_matches_argmax_of_full_forward():
    model = tiny_model()
    out = generate(model, [PROMPTS[0]], max_new_tokens=6, temperature=0)
    seq = out.sequences[0].tolist()
    with torch.no_grad():
        for t in range(5, 11):
            assert model(torch.tensor([seq[:t]]))[0, -1].argmax().item() == seq[t]


def test_eos_stops_each_sequence_and_pads_after():
    model = tiny_model()
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731  same draws in both runs
    free = generate(model, PROMPTS, max_new_tokens=8, generator=seed())
    row1 = free.sequences[1, free.prompt_length:].tolist()
    stop1 = next(j for j in range(1, 8) if row1[j] not in row1[:j])  # a token new at step j >= 1
    eos = row1[stop1]
    out = generate(model, PROMPTS, max_new_tokens=8, eos_id=eos, pad_id=0, generator=seed())
    P = out.prompt_length
    for row in range(3):
        response = out.sequences[row, P:].tolist()
        mask = out.response_mask[row].tolist()
        if eos in response:
            stop = response.index(eos)
            assert all(mask[: stop + 1]) and not any(mask[stop + 1:])
            assert all(t == 0 for t in response[stop + 1:])
        else:
            assert all(mask)
        # up to its own EOS each row matches the run without EOS: rows are independent
        n = sum(mask)
        assert response[:n] == free.sequences[row, P:P + n].tolist()
    assert out.response_mask[1].sum().item() == stop1 + 1
    assert len(set(out.response_mask.sum(1).tolist())) > 1  # rows stopped at different steps


def test_loop_stops_when_all_rows_ended():
    model = tiny_model()
    free = generate(model, [PROMPTS[0], PROMPTS[0]], max_new_tokens=5, temperature=0)
    eos = free.sequences[0, free.prompt_length].item()  # both rows' first token
    out = generate(model, [PROMPTS[0], PROMPTS[0]], max_new_tokens=5, temperature=0, eos_id=eos)
    assert out.sequences.shape == (2, 5 + 1) and out.response_mask.all()


def test_stop_early_false_takes_every_step():
    model = tiny_model()
    free = generate(model, [PROMPTS[0], PROMPTS[0]], max_new_tokens=5, temperature=0)
    eos = free.sequences[0, free.prompt_length].item()
    out = generate(model, [PROMPTS[0], PROMPTS[0]], max_new_tokens=5, temperature=0, eos_id=eos,
                   pad_id=0, stop_early=False)
    assert out.sequences.shape == (2, 5 + 5)
    assert out.response_mask.tolist() == [[True, False, False, False, False]] * 2
    assert (out.sequences[:, 6:] == 0).all()


def test_decoding_runs_in_inference_mode_and_hands_back_tensors_training_can_use():
    """Each step's forward runs under torch.inference_mode (not for a ZeRO-3 model, whose gathered
    weights would become inference tensors); the tokens and the generation come back as ordinary
    tensors that a training forward and backward accept (an inference tensor cannot be saved for
    backward, and the embedding saves its indices)."""
    model = tiny_model()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    decoder = Decoder(model.eval(), PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    first = decoder.step()
    while not decoder.done:
        decoder.step()
    out = decoder.generation()
    assert modes == [True] * 4
    assert not any(t.is_inference() for t in (first, out.sequences, out.attention_mask, out.response_mask))
    model.train()(out.sequences[:, :-1], targets=out.sequences[:, 1:]).backward()
    assert model.token_emb.weight.grad is not None

    model.token_emb.weight.ds_id = 0  # how DeepSpeed marks a ZeRO-3 parameter
    modes.clear()
    generate(model, PROMPTS, max_new_tokens=2)
    assert modes == [False, False]


def test_masks_shapes_and_semantics():
    model = tiny_model().to(torch.bfloat16)
    out = generate(model, PROMPTS, max_new_tokens=7, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, Generation)
    B, P, N = 3, 5, 7
    assert out.prompt_length == P
    assert out.sequences.shape == (B, P + N) and out.sequences.dtype == torch.long
    assert out.attention_mask.shape == (B, P + N) and out.attention_mask.dtype == torch.bool
    assert out.response_mask.shape == (B, N)
    assert torch.equal(out.attention_mask[:, P:], out.response_mask)
    _, prompt_mask = left_pad(PROMPTS, pad_id=0)
    assert torch.equal(out.attention_mask[:, :P], prompt_mask)
    assert out.response_mask.all()  # no EOS given: every step is real


def test_mode_restored_and_long_prompt_rejected():
    model = tiny_model().train()
    generate(model, PROMPTS, max_new_tokens=2, temperature=0)
    assert model.training
    with pytest.raises(UserError, match="max_seq_len"):
        generate(model, [[1] * 35], max_new_tokens=6)
    assert model.training


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 200)
    greedy = sample_next(logits, temperature=0)
    assert greedy.tolist() == [1] * 200
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), greedy)
    top2 = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 3}
    # p(1) = 0.64, p(3) = 0.24: top_p 0.7 keeps both, 0.5 keeps only the first
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 3}
    assert sample_next(logits, 1.0, top_p=0.5, generator=g).tolist() == [1] * 200
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    with pytest.raises(UserError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)
    with pytest.raises(UserError, match="temperature"):
        sample_next(logits, -1.0)


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """Inverse-CDF sampling: frequencies within 4 standard errors of the probabilities over 100k draws,
    a zero-probability token never drawn (also at either end), the same stream from the same seed."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.5, 0.25, 0.15, 0.0]]).expand(100_000, 7).contiguous()
    idx = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=7).double() / len(idx)
    p = probs[0].double()
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(idx)).sqrt() + 1e-12), freq
    assert freq[[0, 2, 6]].sum() == 0
    assert torch.equal(idx, draw(probs, torch.Generator().manual_seed(0)))
    # a row whose sums round below 1 (fp32 over a large vocabulary) still gets a valid index
    big = torch.full((4, 50_000), 1 / 50_000)
    assert draw(big, torch.Generator().manual_seed(1)).max() < 50_000


def test_top_k_one_equals_greedy_generation():
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    top1 = generate(model, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy.sequences, top1.sequences)


# ---------------------------------------------------------------------------------------------
# the step decoder: the same tokens, and the same random draws, as the loop it replaced


@torch.no_grad()
def reference_generate(model, prompts, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None,
                       pad_id=0, generator=None, use_cache=True, stop_early=True):
    """`generate` as it was before `Decoder` (one loop, eos the only stop): the oracle below."""
    model.eval()
    tokens, prompt_mask = left_pad(prompts, pad_id)
    B, P = tokens.shape
    response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    response_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool)
    finished = torch.zeros(B, dtype=torch.bool)
    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    logits = model(tokens, attention_mask=prompt_mask, cache=cache)[:, -1]
    steps = 0
    while True:
        next_token = sample_next(logits, temperature, top_k, top_p, generator).masked_fill(finished, pad_id)
        response[:, steps] = next_token
        response_mask[:, steps] = ~finished
        if eos_id is not None:
            finished |= next_token == eos_id
        steps += 1
        if steps == max_new_tokens or (stop_early and bool(finished.all())):
            break
        if use_cache:
            logits = model(next_token[:, None], attention_mask=response_mask[:, steps - 1:steps], cache=cache)[:, -1]
        else:
            logits = model(torch.cat((tokens, response[:, :steps]), 1),
                           attention_mask=torch.cat((prompt_mask, response_mask[:, :steps]), 1))[:, -1]
    return torch.cat((tokens, response[:, :steps]), 1), torch.cat((prompt_mask, response_mask[:, :steps]), 1)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9)])
@pytest.mark.parametrize("eos_id", [None, 3, 17])
@pytest.mark.parametrize("use_cache, stop_early", [(True, True), (False, True), (True, False)])
def test_generate_matches_the_old_loop_token_for_token(sampling, eos_id, use_cache, stop_early):
    model = tiny_model(kv_heads=2)
    prompts = PROMPTS + [[7]]  # ragged: 5, 2, 3 and 1 tokens
    ours, theirs = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    out = generate(model, prompts, max_new_tokens=15, eos_id=eos_id, pad_id=0, generator=ours, use_cache=use_cache,
                   stop_early=stop_early, **sampling)
    sequences, mask = reference_generate(model, prompts, max_new_tokens=15, eos_id=eos_id, pad_id=0, generator=theirs,
                                         use_cache=use_cache, stop_early=stop_early, **sampling)
    assert torch.equal(out.sequences, sequences) and torch.equal(out.attention_mask, mask)
    assert torch.equal(ours.get_state(), theirs.get_state())  # the random stream is consumed exactly as before


def test_decoder_rows_stopped_by_the_caller():
    """Stopping a row changes nothing for the others, nor the draws: later tokens are pad, masked out."""
    model = tiny_model().eval()
    free_gen, stopped_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    free = Decoder(model, PROMPTS, max_new_tokens=9, generator=free_gen)
    stopped = Decoder(model, PROMPTS, max_new_tokens=9, pad_id=0, generator=stopped_gen)
    stop_at = {0: 2, 2: 5}  # row -> the step it stops on
    while not free.done:
        free.step()
        stopped.step()
        stopped.stop(torch.tensor([stop_at.get(row) == stopped.steps for row in range(3)]))
    a, b = free.generation(), stopped.generation()
    P = a.prompt_length
    assert stopped.steps == 9 and torch.equal(free_gen.get_state(), stopped_gen.get_state())
    for row in range(3):
        n = stop_at.get(row, 9)
        assert b.response_mask[row].tolist() == [True] * n + [False] * (9 - n)
        assert torch.equal(b.sequences[row, :P + n], a.sequences[row, :P + n])
        assert (b.sequences[row, P + n:] == 0).all()
    with pytest.raises(RuntimeError, match="steps"):
        stopped.step()


def test_generate_responses_batches_from_one_stream():
    model = tiny_model()
    prompts = PROMPTS * 3
    batched = generate_responses(model, prompts, batch_size=4, max_new_tokens=6, eos_id=17,
                                 generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expected = []
    for start in (0, 4, 8):
        out = generate(model, prompts[start:start + 4], max_new_tokens=6, eos_id=17, generator=g)
        expected += [out.sequences[r, out.prompt_length:][out.response_mask[r]].tolist() for r in range(len(out.sequences))]
    assert batched == expected and len(batched) == len(prompts)


def test_sample_ignore_eos_takes_every_token_and_reports_its_speed(tmp_path, capsys):
    """`palmrl sample ignore_eos=true` (benchmarks) gives every response max_new_tokens tokens, and
    sample ends with one stderr line of responses, tokens and tokens/s."""
    import json

    from test_serve import tiny_checkpoint

    from palmrl.runtime import run_stage
    from palmrl.stages import sample

    from conftest import compose

    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "out.jsonl"
    cfg = compose("sample", [f"ckpt={ckpt}", "prompt=hi", "num_samples=3", "max_new_tokens=12", "ignore_eos=true",
                             "format=jsonl", f"output={out}"])
    run_stage("sample", cfg, sample.run)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in records] == [12, 12, 12]
    err = capsys.readouterr().err
    assert "sample: 3 responses, 36 tokens in" in err and "tokens/s (cpu, float32" in err

    cfg = compose("sample", [f"ckpt={ckpt}", "prompt=hi", "num_samples=2", "max_new_tokens=5", "ignore_eos=true",
                             "format=jsonl", f"output={out}", "decode_weights=fp16", "overwrite=true"])
    run_stage("sample", cfg, sample.run)
    assert [json.loads(line)["tokens"] for line in out.read_text().splitlines()] == [5, 5]
    assert "tokens/s (cpu, float32, fp16 decode weights, up to" in capsys.readouterr().err


def test_rows_with_one_prompt_fill_the_cache_once():
    """Several rows per prompt (RL's responses to a prompt, best-of-n): the cache is filled once per
    distinct prompt and each row decodes from its own copy. The same tokens as recomputing every row
    without a cache, rows of one prompt still sampled independently; distinct prompts fill every row."""
    model = tiny_model().eval()
    prefilled = []  # token rows layer 0's projection takes in each prompt call
    model.layers[0].fused_proj.register_forward_hook(
        lambda m, args, out: prefilled.append(args[0].shape[:-1].numel()) if args[0].shape[1] > 1 else None)
    prompts = [PROMPTS[i] for i in (0, 1, 0, 2, 1, 0)]
    cached = generate(model, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    assert prefilled == [3 * 5]  # 3 distinct prompts, left-padded to 5
    uncached = generate(model, prompts, max_new_tokens=8, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached.sequences, uncached.sequences)
    responses = cached.sequences[:, 5:]
    assert not (torch.equal(responses[0], responses[2]) and torch.equal(responses[0], responses[5]))

    prefilled.clear()
    generate(model, PROMPTS, max_new_tokens=2)
    assert prefilled == [3 * 5]
