"""PaLM model: causality, padding invariance, KV-cache exactness, paper parameter counts, config errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from palmrl.errors import UserError
from palmrl.model import KVCache, ModelConfig, PaLM, ScalarHead
from palmrl.model.palm import attend_bmm

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

TINY = dict(vocab_size=97, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64)
VARIANTS = {
    "mqa": {},
    "xpos_qknorm_gqa": dict(xpos=True, qk_norm=True, kv_heads=2),
    "mha": dict(kv_heads=4),
}


def tiny_model(seed: int = 0, **overrides) -> PaLM:
    torch.manual_seed(seed)
    model = PaLM(ModelConfig(**{**TINY, **overrides})).eval()
    # random norm scales so the tests see non-trivial LayerNorm / qk-norm weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ragged_batch(seed: int = 1):
    """Three sequences of lengths 20, 14, 17, left-padded to 20."""
    g = torch.Generator().manual_seed(seed)
    lengths = [20, 14, 17]
    tokens = torch.randint(1, TINY["vocab_size"], (3, 20), generator=g)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 20 - n:] = True
        tokens[i, : 20 - n] = 0
    return tokens, mask, lengths


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    model = tiny_model(**VARIANTS[variant])
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_matches_sequence_alone(variant):
    model = tiny_model(**VARIANTS[variant])
    tokens, mask, lengths = ragged_batch()
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        for i, n in enumerate(lengths):
            alone = model(tokens[i:i + 1, 20 - n:])
            torch.testing.assert_close(batch[i, 20 - n:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batch).all()  # pad rows too


def test_no_mask_equals_all_true_mask():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(tokens, attention_mask=torch.ones_like(tokens).bool()),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    tokens, mask, _ = ragged_batch()
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)

        # prompt block of 11 columns, then one column at a time (the last two columns as one call)
        cache = model.new_cache(3, 24)
        parts = [model(tokens[:, :11], attention_mask=mask[:, :11], cache=cache)]
        for t in range(11, 18):
            parts.append(model(tokens[:, t:t + 1], cache=cache))
        parts.append(model(tokens[:, 18:], attention_mask=mask[:, 18:], cache=cache))
        incremental = torch.cat(parts, dim=1)
    assert isinstance(cache, KVCache) and cache.offset == 20
    assert cache.lengths.tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(incremental[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_kept_positions_are_the_only_ones_projected():
    """`keep` (a slice, or a bool mask) gives the logits of those positions, as the full forward does,
    and the output projection sees only those rows; DPO's summed reply log-probs (built on it) equal
    the full logits' token log-probs summed over the reply."""
    from palmrl.rl import token_logprobs
    from palmrl.stages.dpo import reply_logprobs

    model = tiny_model()
    tokens, mask, _ = ragged_batch()
    reply = torch.zeros_like(mask)
    reply[0, 15:], reply[1, 18:], reply[2, 12:16] = True, True, True
    projected = []
    real = model.logits
    model.logits = lambda hidden: projected.append(hidden.shape[:-1]) or real(hidden)
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        sliced = model(tokens, attention_mask=mask, keep=slice(11, -1))
        masked = model(tokens, attention_mask=mask, keep=reply)
        summed = reply_logprobs(model, tokens, mask, reply)
    assert projected[1:] == [(3, 8), (int(reply.sum()),), (int(reply[:, 1:].sum()),)]
    torch.testing.assert_close(sliced, full[:, 11:-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked, full[reply], rtol=0, atol=1e-6)
    expected = torch.where(reply[:, 1:], token_logprobs(full[:, :-1], tokens[:, 1:]), 0.0).sum(1)
    torch.testing.assert_close(summed, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_fused_projections_gradient_is_never_zero_filled_whole(variant):
    """Each block splits its fused projection once: the backward pass joins the parts' gradients
    (one cat), with no zero-filled tensor of the whole projection's shape to add a slice's gradient to
    (it cost ~10% of the bench model's step). The gradients are those of the model's loss either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_model(**VARIANTS[variant]).train()
    block = model.layers[0]
    whole = (2, 16, block.fused_proj.out_features)
    made = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                made.append((func.__name__, tuple(out.shape)))
            return out

    tokens = torch.randint(0, TINY["vocab_size"], (2, 17))
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    with Shapes():
        loss.backward()
    assert ("cat.default", whole) in made  # the split's backward ran here
    zero_filled = [name for name, shape in made if shape == whole and name != "cat.default"]
    assert not zero_filled, zero_filled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_read_positions_meet_the_output_matrix_in_one_product(dtype):
    """RL scoring keeps a slice of positions (keep=), decoding's prompt call the last (last_only): the
    kept hidden states are made contiguous, so their logits are one product with the output matrix.
    A strided slice made torch's matmul expand that matrix per row and, in bf16 on the CPU, copy it
    (B, D, V): palm_small's head on (16, 32, 512) took 545 ms instead of 5.3. Same logits either way.
    Frozen weights, as LoRA's base and the reference have: matmul folds a strided input itself when the
    matrix requires grad. (The profiler watches: a TorchDispatchMode changes how matmul decomposes.)"""
    from torch.profiler import profile

    model = tiny_model().to(dtype).requires_grad_(False)
    tokens = torch.randint(0, TINY["vocab_size"], (3, 10))
    B, D, V = 3, TINY["dim"], TINY["vocab_size"]
    with torch.no_grad():
        full = model(tokens)
        for kwargs, expected in (({"keep": slice(4, 9)}, full[:, 4:9]), ({"last_only": True}, full[:, -1:])):
            with profile(record_shapes=True) as prof:
                logits = model(tokens, **kwargs)
            torch.testing.assert_close(logits, expected, rtol=0, atol=0)
            ops = [(e.name, [list(s) for s in e.input_shapes]) for e in prof.events()]
            assert not [op for op in ops if op[0] == "aten::bmm" and any(s and s[-1] == V for s in op[1])], ops
            assert not [op for op in ops if [B, D, V] in op[1]], "the output matrix was expanded per row"
            assert [op for op in ops if op[0] == "aten::mm" and [D, V] in op[1]], "one product with the matrix"


def grouped_batch(seed: int = 2):
    """RL's layout: 3 prompts (5, 9 and 7 tokens, left-padded to P = 9), 3 responses of N = 6 to each,
    rows shuffled so a prompt's responses are not adjacent; one response ends early (pads after it)."""
    g = torch.Generator().manual_seed(seed)
    P, N = 9, 6
    rows, masks = [], []
    for n in (5, 9, 7):
        prompt = torch.randint(1, TINY["vocab_size"], (n,), generator=g)
        for k in range(3):
            response = torch.randint(1, TINY["vocab_size"], (N,), generator=g)
            real = torch.ones(N, dtype=torch.bool)
            if k == 1:
                real[3:], response[3:] = False, 0
            rows.append(torch.cat((torch.zeros(P - n, dtype=torch.long), prompt, response)))
            masks.append(torch.cat((torch.arange(P) >= P - n, real)))
    order = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[order], torch.stack(masks)[order], P


def rows_into_first_projection(model: PaLM, **kwargs) -> tuple[Tensor, int]:
    """model(**kwargs) and how many token rows layer 0's fused projection multiplied."""
    seen = []
    hook = model.layers[0].fused_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        out = model(**kwargs)
    finally:
        hook.remove()
    return out, sum(seen)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recompute", [False, True])
def test_rows_that_begin_alike_compute_their_prefix_once(variant, recompute):
    """shared_prefix=P (RL's responses to one prompt): the prompt block is computed once per distinct
    (tokens, mask) beginning, wherever its rows sit in the batch, and every row gets the logits and
    gradients of the plain forward; a batch whose beginnings all differ takes the plain path."""
    model = tiny_model(**VARIANTS[variant]).train()
    model.activation_checkpointing = recompute
    tokens, mask, P = grouped_batch()
    B, T = tokens.shape
    results = {}
    for shared in (0, P):
        model.zero_grad()
        logits, rows = rows_into_first_projection(model, tokens=tokens, attention_mask=mask,
                                                  keep=slice(P - 1, -1), shared_prefix=shared)
        (logits.pow(2).mean(-1) * mask[:, P - 1:-1]).sum().backward()
        results[shared] = logits, rows, {n: p.grad.clone() for n, p in model.named_parameters()}
    (plain, plain_rows, plain_grads), (fast, fast_rows, fast_grads) = results[0], results[P]
    assert plain_rows == B * T and fast_rows == 3 * P + B * (T - P)
    read = mask[:, P - 1:-1]  # positions whose logits predict a real response token
    torch.testing.assert_close(fast[read], plain[read], rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # distinct beginnings: nothing to share; one shared position (pad or not) of 15: too little to pay
    distinct = tokens.clone()
    distinct[:, P - 1] = torch.arange(B) + 1
    with torch.no_grad():
        for batch, shared in ((distinct, P), (tokens, 1)):
            out, rows = rows_into_first_projection(model, tokens=batch, attention_mask=mask, shared_prefix=shared)
            assert rows == B * T
            torch.testing.assert_close(out, model(batch, attention_mask=mask), rtol=0, atol=0)


def test_a_pairs_two_replies_share_their_prompt():
    """The reward and DPO stages batch chosen rows, then rejected ones, right-padded: paired_prefix is
    the length every pair has in common (tokens and mask), and with it as shared_prefix each prompt is
    computed once for its two replies, the replies' logits as the plain forward's."""
    from palmrl.model.palm import paired_prefix

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,), generator=g) for n in (6, 4, 8)]
    chosen = [torch.cat((p, torch.randint(1, TINY["vocab_size"], (n,), generator=g))) for p, n in zip(prompts, (3, 5, 2))]
    rejected = [torch.cat((p, torch.randint(1, TINY["vocab_size"], (n,), generator=g))) for p, n in zip(prompts, (4, 2, 3))]
    rows = chosen + rejected
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    P = paired_prefix(tokens, mask)
    assert P == 4  # the shortest prompt (the random replies begin differently)
    model = tiny_model()
    for attention_mask in (mask, None):  # the reward stage reads right-padded rows without a mask
        with torch.no_grad():
            plain, plain_rows = rows_into_first_projection(model, tokens=tokens, attention_mask=attention_mask)
            fast, fast_rows = rows_into_first_projection(model, tokens=tokens, attention_mask=attention_mask,
                                                         shared_prefix=P)
        assert plain_rows == 6 * T and fast_rows == 3 * P + 6 * (T - P)
        torch.testing.assert_close(fast[mask], plain[mask], rtol=1e-5, atol=1e-6)


def test_kv_cache_overflow():
    model = tiny_model()
    tokens, mask, _ = ragged_batch()
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        cache = model.new_cache(3, 20)
        model(tokens[:, :15], attention_mask=mask[:, :15], cache=cache)
        last = model(tokens[:, 15:], cache=cache)
        torch.testing.assert_close(last, full[:, 15:], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KV cache holds 20"):
            model(tokens[:, :1], cache=cache)


@pytest.mark.parametrize("K, G, T, cached", [(1, 4, 9, 0), (2, 2, 8, 5), (1, 3, 1, 6)])
def test_chunked_bmm_attention_matches_sdpa(K, G, T, cached):
    """The CPU attention path (causal skipping) equals SDPA over the full causal pattern."""
    g = torch.Generator().manual_seed(0)
    B, E, S = 2, 8, cached + T
    q, k, v = (torch.randn(B, K, n, E, generator=g, dtype=torch.float64) for n in (T * G, S, S))
    key_mask = torch.rand(B, S, generator=g) > 0.3
    key_mask[:, -T:] = True
    causal = torch.arange(S)[None, :] <= torch.arange(cached, S)[:, None]  # (T, S)
    allowed = (causal[None] & key_mask[:, None, :]).repeat_interleave(G, dim=1)[:, None]  # (B, 1, T*G, S)
    bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(attend_bmm(q, k, v, bias, T), expected)


def test_bf16_forward_and_backward():
    model = tiny_model().to(torch.bfloat16).train()
    tokens = torch.randint(0, 97, (2, 12))
    logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 12, 97)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_structure_no_biases_tied_output():
    model = tiny_model(qk_norm=True)
    names = dict(model.named_parameters())
    assert not any(name.endswith("bias") for name in names)
    assert "layers.0.fused_proj.weight" in names and "layers.1.attn_out.weight" in names
    assert "layers.0.ff_out.weight" in names
    c = model.config
    assert names["layers.0.fused_proj.weight"].shape == (
        c.heads * c.dim_head + 2 * c.kv_heads * c.dim_head + 2 * c.ff_mult * c.dim, c.dim)
    hidden = model.trunk(torch.randint(0, 97, (1, 5)))
    torch.testing.assert_close(model.logits(hidden), hidden @ model.token_emb.weight.T)
    assert not any("rotary" in key for key in model.state_dict())  # no buffers, weights only


@pytest.mark.parametrize("name, paper", [("palm_8b", 8.6e9), ("palm_62b", 62.5e9), ("palm_540b", 540.4e9)])
def test_paper_parameter_counts(name, paper):
    config = ModelConfig.from_dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    with torch.device("meta"):
        model = PaLM(config)
    assert abs(model.num_params() - paper) / paper < 0.05


def test_every_model_yaml_loads_with_exact_keys():
    files = sorted(f for f in CONFIGS.glob("*.yaml") if f.stem != "hf")  # hf.yaml points at a model (test_hf.py)
    assert {f.stem for f in files} >= {"palm_tiny", "palm_small", "palm_125m", "palm_350m", "palm_1b",
                                       "palm_8b", "palm_62b", "palm_540b"}
    fields = set(ModelConfig().to_dict())
    for f in files:
        text = f.read_text()
        assert text.startswith("# "), f
        d = yaml.safe_load(text)
        assert set(d) == fields, f
        assert ModelConfig.from_dict(d).to_dict() == ModelConfig(**d).to_dict()


def test_tiny_config_trains_quickly():
    config = ModelConfig.from_dict(yaml.safe_load((CONFIGS / "palm_tiny.yaml").read_text()))
    torch.manual_seed(0)
    model = PaLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, config.vocab_size, (4, 33))
    losses = []
    for _ in range(20):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # memorises a fixed batch


@pytest.mark.parametrize("bad, key", [
    ({"dimm": 3}, "model.dimm"),
    ({"dim": 0}, "model.dim"),
    ({"depth": -1}, "model.depth"),
    ({"heads": 8, "kv_heads": 3}, "model.kv_heads"),
    ({"dim_head": 7}, "model.dim_head"),
    ({"xpos": "yes"}, "model.xpos"),
    ({"vocab_size": 1.5}, "model.vocab_size"),
    ({"init_std": 0}, "model.init_std"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict(bad)


def test_config_round_trip():
    config = ModelConfig(dim=48, xpos=True)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_scalar_head():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    head = ScalarHead(3)
    assert head(hidden).shape == (2, 4, 1) and torch.equal(head(hidden), torch.zeros(2, 4, 1))
    assert ScalarHead(3, num_outputs=5)(hidden[:, -1]).shape == (2, 5)


def test_a_model_built_on_the_meta_device_draws_nothing():
    """Loading a checkpoint first builds its model on the meta device (checkpoint.check_fits_weights): no
    init runs there, since torch's meta normal_ imports torch._dynamo (1.4 s of each `palmrl sample`)."""
    code = ("import sys, torch\n"
            "from palmrl.model import ModelConfig, PaLM\n"
            "with torch.device('meta'):\n"
            "    m = PaLM(ModelConfig(vocab_size=64, dim=16, depth=2, heads=2, dim_head=8, kv_heads=1, max_seq_len=32))\n"
            "assert all(p.is_meta for p in m.parameters())\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("xpos", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_rotate_half_formula_to_the_last_bit(xpos, dtype):
    """RotaryTables rolls x and keeps sin with rotate_half's sign folded in: the same values as RoFormer's
    x * cos + rotate_half(x) * sin, bit for bit (so the fewer operators change no run's numbers)."""
    from palmrl.model.palm import Rotary

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    tables = Rotary(dim_head=16, base=10000.0, xpos=xpos, xpos_scale_base=512, center=64)(
        torch.tensor([[0, 3, 7, 100, 127]]), torch.float32)
    assert tables.shared is not xpos
    x = torch.randn(2, 5, 3, 16).to(dtype)
    for rotate, cos, signed_sin in ((tables.queries, tables.q_cos, tables.q_sin),
                                    (tables.keys, tables.k_cos, tables.k_sin)):
        sin = torch.cat((-signed_sin[..., :8], signed_sin[..., 8:]), dim=-1)  # negation is exact
        assert torch.equal(sin[..., :8], sin[..., 8:])  # the two halves hold the same frequencies
        assert torch.equal(rotate(x), x * cos.to(dtype) + rotate_half(x) * sin.to(dtype))


def test_a_decoding_step_gives_the_pattern_of_the_whole_sequence_at_once():
    """A one-token step after the prompt takes a shortcut in _positions_and_pattern; its attention pattern
    and its real tokens' positions are the last row of the general path's over the whole sequence so far
    (pads in the new column included), and the rotary rows a cache indexes are those computed directly."""
    torch.manual_seed(0)
    model = PaLM(ModelConfig(vocab_size=64, dim=16, depth=1, heads=2, dim_head=8, kv_heads=1, max_seq_len=32))
    model.requires_grad_(False)
    tokens = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4], [0, 0, 0, 7]])
    mask = tokens != 0
    cache = model.new_cache(3, 12)
    model(tokens, attention_mask=mask, cache=cache)
    for column in ([[True], [False], [True]], [[False], [True], [True]], [[True], [True], [True]]):
        step, step_mask = torch.tensor([[9], [8], [7]]), torch.tensor(column)
        tokens, mask = torch.cat((tokens, step), 1), torch.cat((mask, step_mask), 1)
        positions, allowed = model._positions_and_pattern(step, step_mask, cache)
        whole = model.new_cache(3, 12)
        all_positions, all_allowed = model._positions_and_pattern(tokens, mask, whole)
        assert torch.equal(allowed, all_allowed[:, -1:])
        # a pad's position is never used (nothing attends to it); real tokens are placed alike
        assert torch.equal(positions[step_mask], all_positions[:, -1:][step_mask])
        assert torch.equal(cache.key_mask, whole.key_mask) and torch.equal(cache.lengths, whole.lengths)
        cache.offset += 1  # what the model's forward does after its layers
    direct = model.rotary(positions, torch.float32)
    model(step, attention_mask=step_mask, cache=cache)
    indexed = cache.rotary.at(positions)
    assert torch.equal(direct.q_cos, indexed.q_cos) and torch.equal(direct.q_sin, indexed.q_sin)
