"""The GPU memory and speed paths, proven equal to the plain ones on the CPU: flash-eligible causal
attention, activation checkpointing, chunked cross-entropy (palmrl/model/palm.py, model/loss.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palmrl.model.loss import cross_entropy
from palmrl.model.palm import ModelConfig, PaLM

pytestmark = pytest.mark.unit


def small_model(seed: int = 0, **overrides) -> PaLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=96, dim=32, depth=3, heads=4, dim_head=8, kv_heads=1, max_seq_len=64)
    return PaLM(ModelConfig(**{**settings, **overrides}))


def loss_and_grads(model: PaLM, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a: tuple, b: tuple, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped, multi-head
def test_causal_sdpa_path_equals_the_folded_path(kv_heads):
    """The flash-eligible path (no mask tensor, is_causal, shared k/v heads) vs the folded bmm path."""
    model = small_model(kv_heads=kv_heads, qk_norm=kv_heads == 2)
    tokens = torch.randint(0, 96, (3, 33))
    model.causal_sdpa = False
    folded = loss_and_grads(model, tokens)
    model.causal_sdpa = True
    assert_same(loss_and_grads(model, tokens), folded)


def test_causal_sdpa_path_gets_no_mask_tensor(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((attn_mask, kwargs.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = small_model()
    model.causal_sdpa = True
    model(torch.randint(0, 96, (2, 16)))
    assert seen == [(None, True)] * 3
    seen.clear()  # a padded batch keeps the masked path
    model(torch.randint(0, 96, (2, 16)), attention_mask=torch.ones(2, 16, dtype=torch.bool).tril(8)[:, :16])
    assert seen == []  # on the CPU that path is the bmm one


def test_the_causal_path_is_chosen_off_the_cpu_only_by_default():
    with torch.device("meta"):
        model = small_model()
    assert model.causal_sdpa is None  # auto: tokens.device.type != "cpu" (palm.trunk)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kv_heads):
    model = small_model(kv_heads=kv_heads)
    tokens = torch.randint(0, 96, (4, 40))
    plain = loss_and_grads(model, tokens)
    model.activation_checkpointing = True
    assert_same(loss_and_grads(model, tokens), plain, tol=1e-6)


def test_activation_checkpointing_recomputes_blocks_in_backward():
    """Each block runs again in the backward pass (that is where the memory comes from)."""
    model = small_model()
    runs = []
    for block in model.layers:  # (forward hooks do not fire when checkpoint recomputes)
        block.forward = lambda *args, _forward=block.forward, **kwargs: runs.append(1) or _forward(*args, **kwargs)
    tokens = torch.randint(0, 96, (2, 20))
    model.activation_checkpointing = True
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert len(runs) == 2 * len(model.layers)
    runs.clear()
    with torch.no_grad():  # no recomputation without a backward pass
        model(tokens)
    assert len(runs) == len(model.layers)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("piece_rows", [None, 3])
def test_chunked_cross_entropy_equals_the_full_one(dtype, tol, ignore, piece_rows, monkeypatch):
    """Chunks of 7 rows, each whole or (a CPU's cache-sized pieces) in pieces of 3: the loss and both
    gradients equal F.cross_entropy's."""
    import palmrl.model.loss as loss_module

    if piece_rows:
        monkeypatch.setattr(loss_module, "CPU_PIECE_ELEMENTS", piece_rows * 300)
        assert loss_module.piece_rows_for(300, 7, torch.device("cpu")) == 3
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (50,))
    if ignore:
        targets[::3] = -100
    full = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)
    full.backward()
    expected = (full.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    chunked = cross_entropy(hidden, weight, targets, chunk_rows=7)  # 8 chunks, the last one short
    (chunked * 1.0).backward()
    for got, want in zip((chunked.detach(), hidden.grad, weight.grad), expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_rows_that_do_not_count_are_never_projected(chunk_rows):
    """An ignored row (an SFT prompt) costs no output projection: NaN there leaves the loss and both
    gradients finite, and they equal the loss over the counted rows alone; ignore_index=None counts
    every row, as the default does when none is ignored."""
    torch.manual_seed(2)
    hidden = torch.randn(4, 9, 16)
    weight = torch.randn(300, 16) * 0.3
    targets = torch.randint(0, 300, (4, 9))
    targets[:, :6] = -100  # a prompt: 3 counted positions per row
    poisoned = hidden.clone()
    poisoned[:, :6] = float("nan")
    results = []
    for h, t in ((poisoned, targets), (hidden[:, 6:], targets[:, 6:])):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = cross_entropy(h, w, t, chunk_rows=chunk_rows)
        loss.backward()
        results.append((loss.detach(), h.grad[:, -3:], w.grad))
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    counted = torch.randint(0, 300, (4, 9))
    assert torch.equal(cross_entropy(hidden, weight, counted, chunk_rows=chunk_rows),
                       cross_entropy(hidden, weight, counted, ignore_index=None, chunk_rows=chunk_rows))


def test_chunked_cross_entropy_scales_with_the_upstream_gradient_and_skips_frozen_weights():
    torch.manual_seed(1)
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(40, 8)  # frozen (LoRA): no weight gradient is accumulated
    targets = torch.randint(0, 40, (20,))
    (3.0 * cross_entropy(hidden, weight, targets, chunk_rows=6)).backward()
    chunked = hidden.grad.clone()
    hidden.grad = None
    (3.0 * F.cross_entropy(hidden @ weight.t(), targets)).backward()
    torch.testing.assert_close(chunked, hidden.grad)
    with torch.no_grad():
        assert cross_entropy(hidden, weight, targets, chunk_rows=6).requires_grad is False


def test_model_loss_through_targets_equals_logits_then_cross_entropy():
    model = small_model(vocab_size=200)
    tokens = torch.randint(0, 200, (4, 30))
    plain = loss_and_grads(model, tokens)
    model.zero_grad()
    import palmrl.model.loss as loss_module

    before = loss_module.CHUNK_ELEMENTS
    loss_module.CHUNK_ELEMENTS = 200 * 16  # 16 rows per chunk: 8 chunks of 116 rows
    try:
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
    finally:
        loss_module.CHUNK_ELEMENTS = before
    assert_same((loss.detach(), {n: p.grad for n, p in model.named_parameters()}), plain)


def test_a_model_built_partitioned_under_zero_init_has_the_same_weights(dist_env):
    """ZeRO-3's zero.Init partitions every parameter as its module is built; PaLM's own init then
    gathers each one: the weights equal those of the same model built whole from the same seed."""
    import deepspeed

    config = dict(vocab_size=96, dim=32, depth=3, heads=4, dim_head=8, kv_heads=1, max_seq_len=64)
    torch.manual_seed(0)
    whole = PaLM(ModelConfig(**config))
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        partitioned = PaLM(ModelConfig(**config))
    params = list(partitioned.parameters())
    assert all(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params):
        for (name, a), b in zip(whole.named_parameters(), params, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
