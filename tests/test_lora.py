"""LoRA scopes over one frozen PaLM base: freezing, switching, merging, state dicts, errors."""

import pytest
import torch
import torch.nn.functional as F

from palmrl.errors import UserError
from palmrl.model import (
    LoRAConfig,
    LoRALinear,
    ModelConfig,
    PaLM,
    add_lora,
    freeze_except_lora,
    load_lora_state_dict,
    lora_scope,
    lora_scopes,
    lora_state_dict,
    merge_lora,
    set_lora_scope,
)

CONFIG = ModelConfig(vocab_size=97, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64)
TOKENS = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def base_model() -> PaLM:
    torch.manual_seed(0)
    return PaLM(CONFIG)


def train_scope(model: PaLM, scope: str, steps: int = 3) -> None:
    """A few AdamW steps on the scope's adapters only."""
    freeze_except_lora(model, scope)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with lora_scope(model, scope):
        for _ in range(steps):
            logits = model(TOKENS[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()


def test_names_and_wrapping():
    model = base_model()
    add_lora(model, "actor", LoRAConfig(rank=4))
    add_lora(model, "critic", LoRAConfig(rank=2, targets=("attn_out",)))
    names = dict(model.named_parameters())
    assert "layers.0.fused_proj.lora_A.actor" in names and "layers.1.ff_out.lora_B.actor" in names
    assert "layers.0.attn_out.lora_A.critic" in names and "layers.0.fused_proj.lora_A.critic" not in names
    assert isinstance(model.layers[0].fused_proj, LoRALinear)
    assert lora_scopes(model) == ["actor", "critic"]
    assert sum(name.endswith(".critic") for name, _ in model.named_parameters()) == 2 * CONFIG.depth
    # the base weight keeps its name: a plain PaLM state dict loads into the LoRA model
    base_state = base_model().state_dict()
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected and all("lora_" in name for name in missing)


def test_fresh_adapters_change_nothing_and_scope_none_is_base():
    model = base_model()
    with torch.no_grad():
        reference = model(TOKENS)
    add_lora(model, "actor", LoRAConfig())
    with torch.no_grad(), lora_scope(model, "actor"):
        assert torch.equal(model(TOKENS), reference)  # B starts at zero


def test_base_frozen_grads_only_in_adapters():
    model = base_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_lora(model, "actor", LoRAConfig(rank=4))
    train_scope(model, "actor")
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, before[name]), name  # bit-identical

    # a backward pass reaches the adapters only
    with lora_scope(model, "actor"):
        model(TOKENS).sum().backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(name.endswith(".actor") for name in grads)


def test_scopes_switch():
    model = base_model()
    with torch.no_grad():
        base = model(TOKENS)
    add_lora(model, "actor", LoRAConfig(rank=4))
    add_lora(model, "critic", LoRAConfig(rank=4))
    train_scope(model, "actor")
    with torch.no_grad():
        with lora_scope(model, "actor"):
            actor = model(TOKENS)
        with lora_scope(model, "critic"):
            critic = model(TOKENS)  # untrained: still the base
        with lora_scope(model, None):
            reference = model(TOKENS)
    assert not torch.allclose(actor, base)
    assert torch.equal(critic, base) and torch.equal(reference, base)

    # the context manager restores the previous scope; set_lora_scope is sticky
    set_lora_scope(model, "actor")
    with lora_scope(model, None):
        pass
    with torch.no_grad():
        assert torch.equal(model(TOKENS), actor)
    with pytest.raises(UserError, match="reward"):
        set_lora_scope(model, "reward")


def test_merge_equals_unmerged():
    model = base_model()
    add_lora(model, "actor", LoRAConfig(rank=4, alpha=8.0))
    train_scope(model, "actor")
    with torch.no_grad(), lora_scope(model, "actor"):
        unmerged = model(TOKENS)
    merge_lora(model, "actor")
    assert lora_scopes(model) == [] and not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), unmerged, atol=1e-5, rtol=1e-5)
    # merged weights load into a plain PaLM and give the same logits
    plain = PaLM(CONFIG)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(TOKENS), unmerged, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    model = base_model()
    add_lora(model, "actor", LoRAConfig(rank=4))
    add_lora(model, "critic", LoRAConfig(rank=4))
    train_scope(model, "actor")
    train_scope(model, "critic")
    state = lora_state_dict(model)
    assert state and all("lora_" in name for name in state)
    assert set(lora_state_dict(model, "actor")) == {n for n in state if n.endswith(".actor")}

    fresh = base_model()
    add_lora(fresh, "actor", LoRAConfig(rank=4))
    add_lora(fresh, "critic", LoRAConfig(rank=4))
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        for scope in ("actor", "critic"):
            with lora_scope(model, scope), lora_scope(fresh, scope):
                assert torch.equal(model(TOKENS), fresh(TOKENS))

    # strict: one scope alone is fine, but a partial scope or a foreign tensor is not
    load_lora_state_dict(fresh, lora_state_dict(model, "actor"))
    partial = dict(lora_state_dict(model, "actor"))
    partial.pop(next(iter(partial)))
    with pytest.raises(UserError, match="missing"):
        load_lora_state_dict(fresh, partial)
    with pytest.raises(UserError, match="lacks"):
        load_lora_state_dict(fresh, {**state, "layers.0.fused_proj.lora_A.reward": state[next(iter(state))]})
    other_rank = base_model()
    add_lora(other_rank, "actor", LoRAConfig(rank=2))
    with pytest.raises(UserError, match="shape"):
        load_lora_state_dict(other_rank, lora_state_dict(model, "actor"))


def test_errors():
    model = base_model()
    with pytest.raises(UserError, match="lora.rank"):
        add_lora(model, "actor", LoRAConfig(rank=33))  # attn_out is 32 -> 32
    with pytest.raises(UserError, match="lora.targets"):
        add_lora(model, "actor", LoRAConfig(targets=("q_proj",)))
    with pytest.raises(UserError, match="lora.rank"):
        LoRAConfig(rank=0)
    add_lora(model, "actor", LoRAConfig())
    with pytest.raises(UserError, match="actor"):
        add_lora(model, "actor", LoRAConfig())
    assert LoRAConfig(rank=4, targets=["ff_out"]).targets == ("ff_out",)


def test_bf16_base_with_adapters():
    model = base_model().to(torch.bfloat16)
    add_lora(model, "actor", LoRAConfig(rank=4))
    assert model.layers[0].fused_proj.lora_A["actor"].dtype == torch.bfloat16
    train_scope(model, "actor", steps=1)
    merge_lora(model, "actor")
    assert model.layers[0].fused_proj.weight.dtype == torch.bfloat16



@pytest.mark.parametrize("alpha, exact", [(16.0, True), (12.0, False)])
def test_the_update_is_added_into_the_base_output_without_an_output_sized_temporary(alpha, exact):
    """The adapter's update is accumulated into the base product by one addmm, its scale applied to the
    r-wide x A^T: no (n, out) update is written, scaled and added. With a power-of-two scale (the
    presets: alpha = 2 * rank) output and gradients equal the textbook x W^T + (x A^T B^T) * scale to the
    last bit; any other scale to float rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False)
    layer = LoRALinear(base)
    layer.add_scope("actor", LoRAConfig(rank=8, alpha=alpha))
    with torch.no_grad():
        layer.lora_B["actor"].normal_()
    layer.active_scope = "actor"
    x = torch.randn(3, 5, 24, requires_grad=True)
    made = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.append((func.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return out

    with Shapes():
        out = layer(x)
    output_sized = [name for name, shape in made if shape is not None and shape[-1] == 40 and name not in
                    ("mm.default", "addmm_.default", "view.default", "_unsafe_view.default", "t.default")]
    assert not output_sized, output_sized
    assert sum(name == "addmm_.default" for name, _ in made) == 1

    A, B, scale = layer.lora_A["actor"], layer.lora_B["actor"], alpha / 8
    textbook = F.linear(x, base.weight) + F.linear(F.linear(x, A), B) * scale
    grads = torch.autograd.grad(out.square().sum(), (x, A, B))
    textbook_grads = torch.autograd.grad(textbook.square().sum(), (x, A, B))
    if exact:
        assert torch.equal(out, textbook)
        assert all(torch.equal(g, t) for g, t in zip(grads, textbook_grads))
    else:
        torch.testing.assert_close(out, textbook)
        for g, t in zip(grads, textbook_grads):  # sums of squares of ~10: absolute rounding of ~1e-5
            torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-4)
