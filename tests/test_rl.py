"""Tests for palmrl.rl: every expected number is worked out by hand in the comments."""

import math

import pytest
import torch

from palmrl import rl
from palmrl.rl import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    leave_one_out,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reference_variant_loss,
    sequence_scores,
    shaped_rewards,
    token_logprobs,
)

pytestmark = pytest.mark.unit

T, F = True, False
LN2 = math.log(2.0)


def assert_close(actual, expected, tol=1e-5):
    return torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=tol,
        rtol=tol,
    )


# --- log-probs and entropy -------------------------------------------------------------------


def test_token_logprobs_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert_close(out, expected)


def test_token_logprobs_hand_values_and_gradient():
    # logits [ln 3, 0] -> p = [3/4, 1/4]; token 1 -> ln(1/4); d logp / d logits = onehot - p
    logits = torch.tensor([[[math.log(3.0), 0.0]]], requires_grad=True)
    out = token_logprobs(logits, torch.tensor([[1]]))
    assert_close(out, [[math.log(0.25)]])
    out.sum().backward()
    assert_close(logits.grad, [[[-0.75, 0.75]]])


def test_token_logprobs_bf16_in_fp32_math():
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 300) * 8).to(torch.bfloat16)
    tokens = torch.randint(0, 300, (2, 4))
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    # same bf16 values, upcast first: fp32 math, so agreement to fp32 precision (bf16 math would be ~1e-1 off)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert_close(out, expected, tol=1e-5)


@pytest.mark.parametrize("group", [1 << 20, 200, 50])  # all rows at once; 3 rows a group; one row each (larger)
def test_rows_in_groups_give_each_rows_own_values_to_the_last_bit(monkeypatch, group):
    """Rows go through in groups of GROUP_ELEMENTS logits (one at a time where a row is larger): every
    value and gradient equals the row computed alone, bit for bit."""
    from palmrl.rl import logprobs

    monkeypatch.setattr(logprobs, "GROUP_ELEMENTS", group)
    torch.manual_seed(3)
    logits = (torch.randn(7, 6, 11) * 3).requires_grad_()
    tokens = torch.randint(0, 11, (7, 6))
    lp, h = token_logprobs(logits, tokens), entropy_from_logits(logits)
    (lp.sum() + h.sum()).backward()
    for b in range(7):
        row = logits[b:b + 1].detach().clone().requires_grad_()
        lp_b, h_b = token_logprobs(row, tokens[b:b + 1]), entropy_from_logits(row)
        (lp_b.sum() + h_b.sum()).backward()
        assert torch.equal(lp[b], lp_b[0]) and torch.equal(h[b], h_b[0])
        assert torch.equal(logits.grad[b], row.grad[0])
    assert token_logprobs(logits[:0], tokens[:0]).shape == (0, 6)


def test_token_logprobs_shape_mismatch():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_from_logits_hand_values():
    # uniform over 4 -> ln 4; p = [3/4, 1/4, 0, ...] via -inf -> -(3/4 ln 3/4 + 1/4 ln 1/4)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -float("inf"), -float("inf")]]])
    h = entropy_from_logits(logits.to(torch.bfloat16))
    assert h.dtype == torch.float32
    assert_close(h, [[math.log(4.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]], tol=1e-2)
    assert_close(entropy_from_logits(logits[:, :1]), [[math.log(4.0)]])
    # a filtered (-inf) logit must not turn the entropy or its gradient into nan
    logits.requires_grad_(True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


# --- masked statistics -----------------------------------------------------------------------


def test_masked_mean_and_var_ignore_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, -50.0, float("inf")]])
    mask = torch.tensor([[T, T, T, F], [T, T, F, F]])
    # real values 1..5: mean 3, squared deviations 4+1+0+1+4 = 10 -> biased 10/5 = 2, unbiased 10/4 = 2.5
    assert_close(masked_mean(x, mask), 3.0)
    assert_close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    assert_close(masked_var(x, mask), 2.5)
    assert_close(masked_var(x, mask, unbiased=False), 2.0)
    # degenerate sets: empty -> mean 0, var 0; a single value -> var 0
    assert_close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    assert_close(masked_var(x, torch.tensor([[T, F, F, F], [F, F, F, F]])), 0.0)


def test_masked_whiten_zero_mean_unit_var_over_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[T, T, T, F], [T, T, F, F]])
    w = masked_whiten(x, mask)
    # (x - 3) / sqrt(2.5) on the real tokens, 0 on padding
    s = math.sqrt(2.5)
    assert_close(w, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    assert_close(masked_mean(w, mask), 0.0)
    assert_close(masked_var(w, mask), 1.0)
    # padding values do not matter
    x2 = x.clone()
    x2[~mask] = 1e6
    assert_close(masked_whiten(x2, mask), w)


def test_masked_whiten_keep_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[T, T, T, F], [T, T, F, F]])
    w = masked_whiten(x, mask, shift_mean=False)
    # (x - 3) / sqrt(2.5) + 3: unit variance, mean stays 3
    assert_close(masked_mean(w, mask), 3.0)
    assert_close(masked_var(w, mask), 1.0)
    assert_close(w[0, 0], -2 / math.sqrt(2.5) + 3.0)


def test_explained_variance():
    target = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[T, T, T, F]])
    assert_close(explained_variance(target, target, mask), 1.0)
    assert_close(explained_variance(torch.full_like(target, 2.0), target, mask), 0.0)  # mean of 1, 2, 3
    # pred = [1, 2, 2]: residual [0, 0, 1] var 2/9; target var 2/3 -> 1 - 1/3
    assert_close(explained_variance(torch.tensor([[1.0, 2.0, 2.0, -5.0]]), target, mask), 2.0 / 3.0)
    assert torch.isnan(explained_variance(target, torch.ones_like(target), mask))


# --- KL estimators and controllers -----------------------------------------------------------


def test_kl_estimators_hand_values():
    # position 0: lp = ln .5, ref = ln .25 -> lp - ref = ln 2; position 1: the reverse, -ln 2
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    assert_close(kl_penalty(lp, ref, "k1"), [[LN2, -LN2]])
    assert_close(kl_penalty(lp, ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])  # 0.240227 both
    # k3 = exp(ref - lp) - 1 - (ref - lp): 0.5 - 1 + ln 2 = 0.193147; 2 - 1 - ln 2 = 0.306853
    assert_close(kl_penalty(lp, ref, "k3"), [[0.5 - 1 + LN2, 2 - 1 - LN2]])
    assert_close(kl_penalty(lp, ref, "abs"), [[LN2, LN2]])
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(lp, ref, "k4")


def test_adaptive_kl_controller_moves_toward_target_and_round_trips():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # kl 12: error clip(12/6 - 1) = +0.2 -> 0.2 * (1 + 0.2 * 100 / 10000) = 0.2004
    assert_close(ctl.update(12.0, n_steps=100), 0.2004, tol=1e-9)
    assert_close(ctl.value, 0.2004, tol=1e-9)
    # kl 3: error clip(3/6 - 1 = -0.5) = -0.2 -> 0.2004 * 0.998 = 0.1999992
    ctl.update(3.0, n_steps=100)
    assert_close(ctl.value, 0.2004 * 0.998, tol=1e-9)
    # kl 6.6: error 0.1, unclipped -> x (1 + 0.1 * 1000 / 10000) = x 1.01
    before = ctl.value
    ctl.update(6.6, n_steps=1000)
    assert_close(ctl.value, before * 1.01, tol=1e-9)

    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value  # exact
    assert resumed.update(9.0, 64) == ctl.update(9.0, 64)
    with pytest.raises(ValueError, match="fixed"):
        resumed.load_state_dict(FixedKLController(0.1).state_dict())
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(init_kl_coef=0.2, target=0.0, horizon=10_000)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    ctl.update(0.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --- reward shaping and GAE ------------------------------------------------------------------


def test_shaped_rewards_score_at_last_real_token_only():
    # k1 = lp - ref: row 0 [0.5, -1, 2, (pad 7)], row 1 [1, (pad 9, pad 9, pad 9)]
    lp = torch.tensor([[0.0, -1.0, 1.0, 7.0], [-1.0, 9.0, 9.0, 9.0]])
    ref = torch.tensor([[-0.5, 0.0, -1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[T, T, T, F], [T, F, F, F]])
    out = shaped_rewards(torch.tensor([1.0, -2.0]), lp, ref, mask, kl_coef=0.1)
    assert_close(out.kl, [[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # -0.1 * kl, score added at index 2 (row 0) and index 0 (row 1)
    assert_close(out.rewards, [[-0.05, 0.1, -0.2 + 1.0, 0.0], [-0.1 - 2.0, 0.0, 0.0, 0.0]])
    # per-row KL sums 1.5 and 1.0 -> mean 1.25; non-score rewards -0.15 and -0.1
    assert_close(out.mean_kl, 1.25)
    assert_close(out.non_score_reward, [-0.15, -0.1])
    assert_close(out.scores, [1.0, -2.0])
    assert not out.rewards.requires_grad


def test_shaped_rewards_score_clip_and_empty_row():
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[T, T, T], [T, T, F]])
    out = shaped_rewards(torch.tensor([5.0, -0.5]), lp, lp, mask, kl_coef=0.2, score_clip=1.5)
    # KL 0 everywhere: the only rewards are the clipped scores 1.5 and -0.5
    assert_close(out.rewards, [[0.0, 0.0, 1.5], [0.0, -0.5, 0.0]])
    with pytest.raises(ValueError, match=r"\[1\]"):
        shaped_rewards(torch.zeros(2), lp, lp, torch.tensor([[T, F, F], [F, F, F]]), kl_coef=0.1)


def test_sequence_scores_penalty_then_clip_by_hand():
    # rows 1 and 3 did not end with eos: -1 each; then clip to +-2
    raw = torch.tensor([0.5, 0.5, 3.0, -1.5])
    ended = torch.tensor([T, F, T, F])
    out = sequence_scores(raw, ended, missing_eos_penalty=-1.0, clip=2.0)
    assert_close(out.penalised, [0.5, -0.5, 3.0, -2.5])
    assert_close(out.clipped, [0.5, -0.5, 2.0, -2.0])
    # the same numbers as adding a 0/penalty vector, bit for bit (what PPO did inline before)
    assert torch.equal(out.penalised, raw + torch.tensor([0.0, -1.0, 0.0, -1.0]))
    assert out.penalised.dtype == torch.float32


def test_sequence_scores_switched_off():
    raw = torch.tensor([7.0, -9.0], dtype=torch.float64)
    out = sequence_scores(raw, torch.tensor([F, F]))
    assert out.penalised.dtype == torch.float32
    assert torch.equal(out.penalised, raw.float()) and torch.equal(out.clipped, raw.float())
    with pytest.raises(ValueError, match="ended shape"):
        sequence_scores(raw, torch.tensor([T]))


def test_gae_one_row_by_hand():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72); 3 real tokens then a padded slot holding junk
    rewards = torch.tensor([[-0.1, 0.2, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 7.0]])
    mask = torch.tensor([[T, T, T, F]])
    # delta_2 = 1.0 + 0.9 * 0 - 0.2          = 0.8     (no value after the last real token)
    # delta_1 = 0.2 + 0.9 * 0.2 - 0.4        = -0.02
    # delta_0 = -0.1 + 0.9 * 0.4 - 0.5       = -0.24
    # A_2 = 0.8
    # A_1 = -0.02 + 0.72 * 0.8   = 0.556
    # A_0 = -0.24 + 0.72 * 0.556 = 0.16032
    # returns = A + V = [0.66032, 0.956, 1.0]; padding: 0 and 0
    out = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(out.advantages, [[0.16032, 0.556, 0.8, 0.0]])
    assert_close(out.returns, [[0.66032, 0.956, 1.0, 0.0]])


def test_gae_ragged_batch_by_hand():
    # row 0: one real token, junk 9s in the padding; row 1: three real tokens, values 0
    rewards = torch.tensor([[2.0, 9.0, 9.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[T, F, F], [T, T, T]])
    # row 0: A_0 = 2.0 - 0.5 = 1.5, return 2.0
    # row 1: deltas [0, 0, 1] -> A_2 = 1, A_1 = 0.72, A_0 = 0.72^2 = 0.5184; returns the same
    out = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(out.advantages, [[1.5, 0.0, 0.0], [0.5184, 0.72, 1.0]])
    assert_close(out.returns, [[2.0, 0.0, 0.0], [0.5184, 0.72, 1.0]])


def test_gae_lam_one_gamma_one_is_reward_to_go_minus_value():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t; rewards [1, 2, 3] -> to-go [6, 5, 3]
    out = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool),
              gamma=1.0, lam=1.0)
    assert_close(out.advantages, [[5.0, 4.0, 2.0]])
    assert_close(out.returns, [[6.0, 5.0, 3.0]])



def test_leave_one_out_baseline_by_hand():
    # two prompts, three samples each: each score minus the mean of the other two
    scores = torch.tensor([1.0, 0.0, 0.0, 5.0, 7.0, 9.0])
    assert_close(leave_one_out(scores, 3), [1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
    # a constant offset per prompt (a reward model that scores one prompt high) cancels
    assert_close(leave_one_out(scores + torch.tensor([10.0] * 3 + [-4.0] * 3), 3), leave_one_out(scores, 3))
    with pytest.raises(ValueError):
        leave_one_out(scores, 4)
    with pytest.raises(ValueError):
        leave_one_out(scores, 1)


# --- PPO losses ------------------------------------------------------------------------------


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -3.0, 2.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[T, T, T], [T, F, F]])
    out = ppo_policy_loss(lp, lp.detach(), adv, mask, clip_eps=0.2)
    # -(1 - 3 + 2 + 4) / 4 = -1
    assert_close(out.loss, -1.0)
    assert_close(out.clip_frac, 0.0)
    assert_close(out.approx_kl, 0.0)
    assert_close(out.ratio_mean, 1.0)
    assert out.loss.requires_grad and not out.clip_frac.requires_grad


def test_policy_loss_clipping_by_hand():
    # eps 0.2; tokens (ratio, advantage):
    #  A (1.5, +1): -1.5 vs clipped -1.2 -> max -1.2, clipped binds
    #  B (0.5, +1): -0.5 vs clipped -0.8 -> max -0.5, unclipped
    #  C (0.5, -1): +0.5 vs clipped +0.8 -> max +0.8, clipped binds
    #  D (1.5, -2): +3.0 vs clipped +2.4 -> max +3.0, unclipped
    #  E padding (ratio 10, advantage 100): ignored
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 10.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[T, T, T, T, F]])
    old = torch.full((1, 5), -1.0)
    lp = (old + ratios.log()).requires_grad_(True)
    out = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    assert_close(out.loss, (-1.2 - 0.5 + 0.8 + 3.0) / 4)  # 0.525
    assert_close(out.clip_frac, 0.5)
    assert_close(out.ratio_mean, 1.0)  # (1.5 + 0.5 + 0.5 + 1.5) / 4
    # k3: (1.5 - 1 - ln 1.5) = 0.094535, (0.5 - 1 - ln 0.5) = 0.193147, two of each
    assert_close(out.approx_kl, (0.5 - math.log(1.5) + -0.5 + LN2) / 2)
    # gradients: clipped tokens 0; B: -A * ratio / 4 = -0.125; D: 2 * 1.5 / 4 = 0.75
    out.loss.backward()
    assert_close(lp.grad, [[0.0, -0.125, 0.0, 0.75, 0.0]])


def test_value_loss_clipping_by_hand():
    # eps 0.2; tokens (value, old value, return):
    #  (2.0, 1.0, 3.0): clipped value 1.2 -> errors 1.0 vs 3.24 -> 3.24, clipped larger
    #  (2.0, 1.0, 0.0): clipped value 1.2 -> errors 4.0 vs 1.44 -> 4.0
    #  (0.1, 0.0, 1.0): inside the range -> 0.81 both, not counted as clipped
    #  padding (50, 0, -50): ignored
    values = torch.tensor([[2.0, 2.0, 0.1, 50.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[3.0, 0.0, 1.0, -50.0]])
    mask = torch.tensor([[T, T, T, F]])
    out = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert_close(out.loss, 0.5 * (3.24 + 4.0 + 0.81) / 3)  # 1.341667
    assert_close(out.clip_frac, 1 / 3)
    # returns [3, 0, 1]: mean 4/3, var (25 + 16 + 1) / 27 = 14/9
    # residuals [1, -2, 0.9]: mean -1/30, var (1 + 4 + 0.81) / 3 - 1/900 = 1.935556 -> EV = -0.244286
    assert_close(out.explained_variance, 1 - (5.81 / 3 - 1 / 900) / (14 / 9))
    # gradient: clipped token has none; others 0.5 * 2 * (V - R) / 3
    out.loss.backward()
    assert_close(values.grad, [[0.0, 2.0 / 3, -0.9 / 3, 0.0]])


# --- lucidrains reference variant ------------------------------------------------------------


def test_reference_variant_no_kl_by_hand():
    # V = 2, uniform logits, new == old: ratio 1, KL 0, entropy ln 2 per token
    logits = torch.zeros(2, 2, 2, requires_grad=True)
    actions = torch.tensor([[0, 1], [1, 0]])
    mask = torch.tensor([[T, T], [T, F]])
    values = torch.tensor([0.5, -0.5], requires_grad=True)
    out = reference_variant_loss(
        logits, logits.detach(), actions, torch.tensor([1.0, -1.0]), values, torch.zeros(2), mask,
        clip_eps=0.2, value_clip=0.4, kl_coef=0.1, entropy_coef=0.01,
    )
    # rewards [1, -1] - old values 0 -> normalised (mean 0, biased var 1) -> advantages [1, -1]
    # surrogate -A per token: row 0 two tokens of -1, row 1 one real token of +1 -> (-1 - 1 + 1) / 3
    assert_close(out.entropy, LN2)
    assert_close(out.kl, 0.0)
    assert_close(out.policy_loss, -1 / 3 - 0.01 * LN2)
    # values clipped to old +- 0.4 = [0.4, -0.4]: max((0.4 - 1)^2, (0.5 - 1)^2) = 0.36 for both rows
    assert_close(out.value_loss, 0.36)
    assert_close(out.loss, -1 / 3 - 0.01 * LN2 + 0.36)
    assert_close(out.clip_frac, 0.0)
    out.loss.backward()
    # value gradient: clipped branch is the max, so no gradient reaches the values
    assert_close(values.grad, [0.0, 0.0])


def test_reference_variant_with_kl_and_clipping_by_hand():
    # row 0: old logits [0, 0] (p = 1/2, 1/2), new [ln 3, 0] (p = 3/4, 1/4), action 0 -> ratio 1.5
    # row 1: new == old uniform, ratio 1
    new = torch.tensor([[[math.log(3.0), 0.0]] * 2, [[0.0, 0.0]] * 2], requires_grad=True)
    old = torch.zeros(2, 2, 2)
    actions = torch.zeros(2, 2, dtype=torch.long)
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = reference_variant_loss(
        new, old, actions, torch.tensor([1.0, -1.0]), torch.tensor([0.5, -0.5]), torch.zeros(2), mask,
        clip_eps=0.2, value_clip=0.4, kl_coef=0.1, entropy_coef=0.01,
    )
    # KL(old || new) row 0 = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.143841; row 1 = 0
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert_close(out.kl, kl0 / 2)
    # entropy row 0 = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335, row 1 = ln 2
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert_close(out.entropy, (h0 + LN2) / 2)
    # rewards [1 - 0.1 kl0, -1]; two rows always normalise to [+1, -1]
    # row 0: min(1.5 * 1, 1.2 * 1) = 1.2 -> -1.2 per token (clipped); row 1: +1 per token
    assert_close(out.policy_loss, (-1.2 * 2 + 1.0 * 2) / 4 - 0.01 * (h0 + LN2) / 2)
    assert_close(out.clip_frac, 0.5)
    # values: row 0 clipped to 0.4 vs target R0 = 1 - 0.1 kl0: max((0.4 - R0)^2, (0.5 - R0)^2);
    # row 1: max((-0.4 + 1)^2, (-0.5 + 1)^2) = 0.36
    r0 = 1 - 0.1 * kl0
    assert_close(out.value_loss, (max((0.4 - r0) ** 2, (0.5 - r0) ** 2) + 0.36) / 2)
    out.policy_loss.backward()
    assert new.grad is not None and torch.isfinite(new.grad).all()


def test_reference_variant_single_sequence_has_zero_advantage():
    # one sequence: normalisation leaves advantage 0, so only the entropy bonus remains
    logits = torch.zeros(1, 3, 4)
    out = reference_variant_loss(
        logits, logits, torch.zeros(1, 3, dtype=torch.long), torch.tensor([3.0]), torch.tensor([0.0]),
        torch.tensor([0.0]), torch.ones(1, 3, dtype=torch.bool),
        clip_eps=0.2, value_clip=0.4, kl_coef=0.1, entropy_coef=0.01,
    )
    assert_close(out.policy_loss, -0.01 * math.log(4.0))
    # value 0 clipped to 0 +- 0.4 stays 0; target 3 -> 9
    assert_close(out.value_loss, 9.0)


# ---- GRPO and DPO ----------------------------------------------------------------------------

@pytest.mark.unit
def test_group_advantages_centre_each_group_and_scale_by_its_std():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    plain = rl.group_advantages(scores, 4, scale="none")
    assert torch.allclose(plain, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    scaled = rl.group_advantages(scores, 4, scale="std")
    assert torch.allclose(scaled[:4], plain[:4] / (torch.tensor([1.0, 0, 0, 0]).std() + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4))  # a group that scored alike teaches nothing, and is not NaN
    with pytest.raises(ValueError):
        rl.group_advantages(scores, 3)


@pytest.mark.unit
def test_grpo_loss_clips_each_side_and_normalises_length_as_configured():
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    old = torch.zeros(2, 4)
    adv = torch.tensor([1.0, 1.0])
    # ratio e^0.5 > 1 + clip_high: a positive advantage gets no more push; with a wider clip_high it does
    lp = torch.full((2, 4), 0.5, requires_grad=True)
    rl.grpo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2).loss.backward()
    assert lp.grad.abs().sum() == 0
    lp.grad = None
    out = rl.grpo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=1.0)
    out.loss.backward()
    assert (lp.grad[mask] < 0).all() and out.clip_frac == 0  # descent raises the advantaged tokens' log-probs
    # GRPO: each sequence weighs the same whatever its length; Dr. GRPO: each token does
    lp = torch.zeros(2, 4, requires_grad=True)
    rl.grpo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2).loss.backward()
    assert torch.allclose(lp.grad[0, 0] * 4, lp.grad[1, 0])
    lp.grad = None
    rl.grpo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, length_norm=False, max_tokens=4).loss.backward()
    assert torch.allclose(lp.grad[0, 0], lp.grad[1, 0])


@pytest.mark.unit
def test_grpo_loss_over_informative_rows_only():
    """Dynamic sampling: rows of flat groups (advantage 0) leave the policy term's average; the KL term
    keeps every row; all rows informative is the plain loss bit for bit."""
    torch.manual_seed(0)
    mask = torch.rand(6, 5) > 0.2
    mask[:, 0] = True
    lp, old, ref = torch.randn(6, 5) - 2, torch.randn(6, 5) - 2, torch.randn(6, 5) - 2
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])
    keep = adv != 0
    kwargs = dict(clip_low=0.2, clip_high=0.28, ref_logprobs=ref, beta=0.1)
    plain = rl.grpo_policy_loss(lp, old, adv, mask, **kwargs)
    assert torch.equal(rl.grpo_policy_loss(lp, old, adv, mask, informative=torch.ones(6, dtype=torch.bool),
                                           **kwargs).loss, plain.loss)
    some = rl.grpo_policy_loss(lp, old, adv, mask, informative=keep, **kwargs)
    no_kl = rl.grpo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    only_kl = (plain.loss - no_kl.loss).item()  # beta * mean over all rows of the per-row KL
    # the policy term over the 4 informative rows = the 6-row mean scaled by 6/4 (flat rows contribute 0)
    assert some.policy_loss.item() == pytest.approx(no_kl.policy_loss.item() * 6 / 4, rel=1e-6)
    assert some.loss.item() == pytest.approx(some.policy_loss.item() + only_kl, rel=1e-6)
    none = rl.grpo_policy_loss(lp, old, adv, mask, informative=torch.zeros(6, dtype=torch.bool), **kwargs)
    assert none.policy_loss == 0 and none.loss.item() == pytest.approx(only_kl, rel=1e-6)


@pytest.mark.unit
def test_grpo_kl_term_is_k3_and_pulls_towards_the_reference():
    mask = torch.ones(1, 3, dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    out = rl.grpo_policy_loss(lp, lp.detach(), torch.zeros(1), mask, clip_low=0.2, clip_high=0.2,
                              ref_logprobs=ref, beta=0.5)
    assert torch.allclose(out.kl, rl.kl_penalty(lp.detach(), ref, "k3").mean())
    out.loss.backward()  # zero advantage: only the KL moves it, towards ref
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] < 0 and lp.grad[0, 2] > 0


@pytest.mark.unit
def test_dpo_losses_at_the_reference_and_their_direction():
    chosen = torch.tensor([-3.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref_c, ref_r = chosen.detach().clone(), rejected.detach().clone()
    out = rl.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    assert torch.allclose(out.loss, torch.log(torch.tensor(2.0)))  # policy = reference: log 2
    assert out.accuracy == 0 and out.margin == 0
    out.loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent: chosen up, rejected down
    smoothed = rl.dpo_loss(chosen + 10, rejected, ref_c, ref_r, beta=0.1, label_smoothing=0.3)
    plain = rl.dpo_loss(chosen + 10, rejected, ref_c, ref_r, beta=0.1)
    assert smoothed.loss > plain.loss and plain.accuracy == 1  # smoothing keeps some doubt in the label
    ipo = rl.dpo_loss(chosen.detach() + 5, rejected.detach(), ref_c, ref_r, kind="ipo", beta=0.1)
    assert torch.allclose(ipo.loss, torch.tensor(0.0))  # IPO's target margin 1/(2β) = 5 is met exactly
    simpo = rl.dpo_loss(chosen, rejected, None, None, kind="simpo", beta=2.0, simpo_gamma=0.5,
                        chosen_lengths=torch.tensor([3, 4]), rejected_lengths=torch.tensor([3, 5]))
    expected = -torch.nn.functional.logsigmoid(2.0 * (chosen.detach() / torch.tensor([3.0, 4.0])
                                                       - rejected.detach() / torch.tensor([3.0, 5.0])) - 0.5).mean()
    assert torch.allclose(simpo.loss, expected)
    with pytest.raises(ValueError):
        rl.dpo_loss(chosen, rejected, None, None, kind="sigmoid")
