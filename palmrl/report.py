"""The report a person reads after a run: per-stage numbers, best-of-n, samples before/after RLHF, plots.

Reads whatever stages `runs/<run>/` holds (tokenizer/ pretrain/ sft/ reward/ ppo/): each stage's
`metrics.jsonl` for the curves and its `final/manifest.json` for the final validation numbers (the
last "val" line of metrics.jsonl stands in when a stage has no final checkpoint yet). Writes into
`runs/<run>/report/`:

    report.md     key-metric tables, best-of-n table, samples, and a link to every PNG
    report.json   the same numbers for machines (the pipeline's quality gates read it)
    pretrain.png sft.png reward.png ppo.png best_of_n.png   (one per stage that exists)

Best-of-n (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325; Nakano et al. 2021 "WebGPT",
https://arxiv.org/abs/2112.09332 §4): sample N responses per held-out task prompt from the final
policy, let the reward model pick the best of each n, and score the picked response with the task
checker. For each n the N samples of a prompt are split into N // n disjoint groups of n, so every
n is averaged over all N samples (n = 1 is the plain mean of single samples: the gate's baseline).
The "oracle" column is the best a perfect reward model could do (any of the n correct).

Plots are drawn on `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no display.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from palmrl.config import CHAIN, RL_STAGES
from palmrl.errors import UserError
from palmrl.tracking import read_metrics

PLOT_NAMES = ("pretrain.png", "sft.png", "reward.png", "ppo.png", "grpo.png", "dpo.png", "rl.png", "best_of_n.png")
PPO_TRAIN_KEYS = ("true_reward", "reward", "kl", "kl_coef", "entropy", "response_tokens", "eos_rate")


@dataclass(frozen=True)
class ReportSettings:
    """The report's knobs (configs/report.yaml mirrors them)."""

    prompts: int = 64             # held-out task prompts for best-of-n; 0 skips it (64 x 8 samples: seconds)
    max_n: int = 8                # n = 1, 2, 4, ... max_n samples per prompt, ranked by the reward model
    temperature: float = 1.0      # the policy's own distribution, as in PPO rollouts
    top_k: int = 0                # 0 disables
    top_p: float = 1.0            # 1.0 disables
    max_new_tokens: int = 24      # task answers are short: SFT's evaluation budget
    samples: int = 6              # held-out prompts shown with the SFT and PPO greedy responses
    split: str = "test"           # never trained on, never used to pick a checkpoint
    seed: int = 0                 # prompts and sampling
    trust_remote_code: bool = False  # the user's consent to run an HF-based checkpoint's own modelling code

    def __post_init__(self) -> None:
        for key, low in (("prompts", 0), ("max_n", 1), ("max_new_tokens", 1), ("samples", 0)):
            value = getattr(self, key)
            if value < low:
                name = key if key == "samples" else f"best_of_n.{key}"
                raise UserError(f"{name} must be >= {low}, got {value}")


class StageRun(NamedTuple):
    name: str                     # tokenizer | pretrain | sft | reward | ppo
    folder: Path                  # runs/<run>/<stage>
    metrics: list[dict]           # metrics.jsonl lines, in order
    manifest: dict | None         # final/manifest.json, None without a final checkpoint


class BestOfNRow(NamedTuple):
    n: int                        # samples the reward model chose from
    true_reward: float            # mean checker score of the picked response
    rm_score: float               # mean raw reward-model score of the picked response
    oracle_true_reward: float     # share of groups with any correct response (a perfect ranker)


class Report(NamedTuple):
    markdown: Path                # <out_dir>/report.md
    json: Path                    # <out_dir>/report.json
    plots: list[Path]             # the PNGs written
    data: dict                    # what report.json holds


# ---------------------------------------------------------------------------------------------
# reading a run folder


def find_stages(run_dir: Path) -> dict[str, StageRun]:
    """The stage folders a run holds, in pipeline order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir: no such run folder: {run_dir}")
    found = {}
    for name in CHAIN:
        folder = run_dir / name
        if not folder.is_dir():
            continue
        manifest_path = folder / "final" / "manifest.json"
        manifest = None
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as err:
                raise UserError(f"{manifest_path}: not valid JSON ({err.msg})") from None
        found[name] = StageRun(name, folder, read_metrics(folder / "metrics.jsonl"), manifest)
    if not found:
        raise UserError(f"run_dir: {run_dir} has no stage folder ({', '.join(s + '/' for s in CHAIN)})")
    return found


def series(metrics: Sequence[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric on one split; lines without the key are skipped."""
    rows = [(m["step"], float(m[key])) for m in metrics
            if m.get("split") == split and isinstance(m.get(key), (int, float)) and "step" in m]
    return [s for s, _ in rows], [v for _, v in rows]


def _final_val(stage: StageRun) -> dict:
    """Final validation metrics: the manifest's, else the last val line of metrics.jsonl."""
    if stage.manifest is not None and stage.manifest.get("metrics"):
        return dict(stage.manifest["metrics"])
    vals = [m for m in stage.metrics if m.get("split") == "val"]
    return dict(vals[-1]) if vals else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


# ---------------------------------------------------------------------------------------------
# per-stage key numbers


def summarise(stages: dict[str, StageRun]) -> dict[str, dict]:
    """The key numbers of every stage (report.json's "stages")."""
    out: dict[str, dict] = {}
    for name, stage in stages.items():
        val = _final_val(stage)
        extra = stage.manifest or {}
        row: dict[str, Any] = {"final_checkpoint": str(stage.folder / "final") if stage.manifest else None,
                               "step": extra.get("step", val.get("step"))}
        if name == "tokenizer":
            row.update(_tokenizer_summary(stage.folder))
        elif name == "pretrain":
            loss, unigram = _number(val.get("loss")), _number(val.get("unigram_loss"))
            row.update(val_loss=loss, perplexity=_number(val.get("perplexity")), unigram_loss=unigram,
                       unigram_perplexity=math.exp(unigram) if unigram is not None else None,
                       below_unigram=unigram - loss if loss is not None and unigram is not None else None,
                       tokens_seen=val.get("tokens_seen"))
        elif name == "sft":
            row.update(accuracy=_number(val.get("accuracy")), init_accuracy=_number(extra.get("init_accuracy")),
                       format_rate=_number(val.get("format_rate")), val_loss=_number(val.get("loss")),
                       response_tokens=_number(val.get("response_tokens")))
        elif name == "reward":
            spec = extra.get("reward") or {}
            objective = spec.get("objective", "binned" if "rating_mae" in val else "pairwise")
            chance = 0.5 if objective == "pairwise" else 1.0 / int(spec.get("num_bins", 5))
            row.update(objective=objective, accuracy=_number(val.get("accuracy")), chance=chance,
                       val_loss=_number(val.get("loss")), margin=_number(val.get("margin")),
                       rating_mae=_number(val.get("rating_mae")), score_mean=_number(val.get("score_mean")),
                       score_std=_number(val.get("score_std")))
        elif name in ("ppo", "grpo"):
            train = [m for m in stage.metrics if m.get("split") == "train"]
            # each rollout batch has other prompts, whose reward-model level varies a lot: compare
            # the means of the first and last few iterations, not two single batches
            window = max(1, min(5, len(train) // 3))

            def pick(rows: list[dict]) -> dict:
                values = {k: [_number(m.get(k)) for m in rows if k in m] for k in PPO_TRAIN_KEYS}
                return {k: sum(v) / len(v) for k, v in values.items() if v and None not in v}
            row.update(iterations=len(train), accuracy=_number(val.get("accuracy")),
                       init_accuracy=_number(extra.get("init_accuracy")), format_rate=_number(val.get("format_rate")),
                       response_tokens=_number(val.get("response_tokens")),
                       train_sampled_reward=_number(val.get("train_sampled_reward")),
                       init_train_sampled_reward=_number(extra.get("init_train_sampled_reward")),
                       sampled_reward=_number(val.get("sampled_reward")),
                       init_sampled_reward=_number(extra.get("init_sampled_reward")),
                       train_window=window, train_first=pick(train[:window]), train_last=pick(train[-window:]),
                       phases=iteration_phases(train))
        elif name == "dpo":
            row.update(accuracy=_number(val.get("accuracy")), init_accuracy=_number(extra.get("init_accuracy")),
                       sampled_reward=_number(val.get("sampled_reward")),
                       init_sampled_reward=_number(extra.get("init_sampled_reward")),
                       reward_accuracy=_number(val.get("reward_accuracy")),
                       reward_margin=_number(val.get("reward_margin")), drift=_number(val.get("drift")),
                       loss=(extra.get("dpo") or {}).get("loss"))
        if name in RL_STAGES:
            row.update(behaviour_rate=_number(val.get("behaviour_rate")),
                       init_behaviour_rate=_number(extra.get("init_behaviour_rate")),
                       wall_s=_number(extra.get("wall_s")))
        out[name] = row
    return out


PHASES = ("generate", "score", "update")  # an online RL iteration: the stage's time_<phase>_s metrics


def iteration_phases(train: Sequence[dict]) -> dict[str, float] | None:
    """Median seconds of each phase of an online RL iteration (iteration 1, the warm-up, left out
    when there are more), or None for runs that did not log them."""
    rows = [m for m in train if all(f"time_{p}_s" in m for p in PHASES)]
    rows = rows[1:] if len(rows) > 1 else rows
    if not rows:
        return None
    return {p: statistics.median(float(m[f"time_{p}_s"]) for m in rows) for p in PHASES}


def phase_rows(summary: dict[str, dict]) -> list[tuple[str, ...]]:
    """Where an online RL iteration's time goes: seconds and share of each phase."""
    rows = []
    for name in ("ppo", "grpo"):
        phases = (summary.get(name) or {}).get("phases")
        if not phases:
            continue
        total = sum(phases.values())
        rows.append((name, *(f"{phases[p]:.2f} s ({phases[p] / total:.0%})" for p in PHASES), f"{total:.2f} s"))
    return rows


PHASE_HEADER = ("stage", "generate (sampling)", "score (policy, reference, reward)", "update (optimizer steps)",
                "iteration")


def _tokenizer_summary(folder: Path) -> dict:
    from palmrl.tokenizer import Tokenizer

    if not ((folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()):
        return {"kind": None, "vocab_size": None}
    tokenizer = Tokenizer.load(folder)
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def key_rows(summary: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(stage, metric, value, compare with) rows: the one table both the terminal and report.md show."""
    rows: list[tuple[str, str, str, str]] = []
    s = summary.get("tokenizer")
    if s:
        rows.append(("tokenizer", "vocabulary", _f(s["vocab_size"]), s["kind"] or "—"))
    s = summary.get("pretrain")
    if s:
        rows.append(("pretrain", "val loss", _f(s["val_loss"]),
                     f"unigram baseline {_f(s['unigram_loss'])} (below by {_f(s['below_unigram'])})"))
        rows.append(("pretrain", "val perplexity", _f(s["perplexity"]), f"unigram {_f(s['unigram_perplexity'])}"))
    s = summary.get("sft")
    if s:
        rows.append(("sft", "checker accuracy (held-out)", _f(s["accuracy"]), f"before SFT {_f(s['init_accuracy'])}"))
        rows.append(("sft", "format rate", _f(s["format_rate"]), "responses ending with eos"))
        rows.append(("sft", "val loss", _f(s["val_loss"]), "response tokens only"))
    s = summary.get("reward")
    if s:
        rows.append(("reward", f"held-out accuracy ({s['objective']})", _f(s["accuracy"]), f"chance {_f(s['chance'])}"))
        if s["objective"] == "pairwise":
            rows.append(("reward", "margin r(chosen) - r(rejected)", _f(s["margin"]), "held-out mean"))
        else:
            rows.append(("reward", "rating MAE", _f(s["rating_mae"]), "held-out"))
    for name in ("ppo", "grpo"):
        s = summary.get(name)
        if not s:
            continue
        first, last, w = s["train_first"], s["train_last"], s.get("train_window", 1)
        span = "iteration" if w == 1 else f"{w} iterations"
        before = f"before {name.upper()}"
        # the policy's expected true reward (fresh samples, fixed prompts): the number that says whether RL helped
        for key, label in (("train_sampled_reward", "true reward, sampled (training prompts)"),
                           ("sampled_reward", "true reward, sampled (held-out)"),
                           ("behaviour_rate", "behaviour rate, sampled (held-out)")):
            if s.get(key) is not None:
                rows.append((name, label, _f(s[key]), f"{before} {_f(s.get('init_' + key))}"))
        for key, label in (("true_reward", "true reward (checker, rollouts)"), ("reward", "RM reward (rollouts)"),
                           ("kl", "KL to SFT (nats/seq)"), ("entropy", "entropy"),
                           ("response_tokens", "response tokens")):
            if key in last:
                rows.append((name, f"{label}, last {span}", _f(last[key]), f"first {span}: {_f(first.get(key))}"))
        rows.append((name, "checker accuracy (held-out)", _f(s["accuracy"]), f"{before} {_f(s['init_accuracy'])}"))
        rows.append((name, "iterations", _f(s["iterations"]), ""))
    s = summary.get("dpo")
    if s:
        rows.append(("dpo", f"implicit reward accuracy (held-out pairs, {s.get('loss')})", _f(s["reward_accuracy"]),
                     "chance 0.5"))
        rows.append(("dpo", "drift from the reference (log-prob/reply)", _f(s["drift"]), "held-out pairs"))
        for key, label in (("sampled_reward", "true reward, sampled (held-out)"),
                           ("behaviour_rate", "behaviour rate, sampled (held-out)"),
                           ("accuracy", "checker accuracy (held-out)")):
            if s.get(key) is not None:
                rows.append(("dpo", label, _f(s[key]), f"before DPO {_f(s.get('init_' + key))}"))
    return rows


RL_HEADER = ("stage", "behaviour rate (held-out)", "true reward (held-out)", "true reward (training prompts)",
             "KL to SFT (nats/seq)", "wall time")


def rl_rows(summary: dict[str, dict]) -> list[tuple[str, ...]]:
    """The RL stages side by side, each "before → after" from the same SFT policy."""
    def change(s: dict, key: str) -> str:
        return f"{_f(s.get('init_' + key), 3)} → {_f(s.get(key), 3)}" if s.get(key) is not None else "—"

    rows = []
    for name in RL_STAGES:
        s = summary.get(name)
        if not s:
            continue
        kl = s.get("train_last", {}).get("kl") if name != "dpo" else s.get("drift")
        rows.append((name, change(s, "behaviour_rate"), change(s, "sampled_reward"), change(s, "train_sampled_reward"),
                     _f(kl, 3) + (" (drift)" if name == "dpo" and kl is not None else ""),
                     f"{s['wall_s']:.0f} s" if s.get("wall_s") is not None else "—"))
    return rows


# ---------------------------------------------------------------------------------------------
# best-of-n and samples


def powers_of_two(max_n: int) -> list[int]:
    """1, 2, 4, ... up to max_n, and max_n itself."""
    if max_n < 1:
        raise UserError(f"best_of_n.max_n must be >= 1, got {max_n}")
    ns = [2**k for k in range(max_n.bit_length()) if 2**k <= max_n]
    return ns if ns[-1] == max_n else [*ns, max_n]


def best_of_n_table(rm_scores: Tensor, correct: Tensor, ns: Sequence[int]) -> list[BestOfNRow]:
    """rm_scores, correct (P, N) → one row per n, each averaged over N // n disjoint groups per prompt."""
    P, N = rm_scores.shape
    rows = []
    for n in ns:
        groups = N // n
        if groups == 0:
            raise ValueError(f"n={n} exceeds the {N} samples per prompt")
        scores = rm_scores[:, :groups * n].reshape(P, groups, n).float()  # (P, G, n)
        hits = correct[:, :groups * n].reshape(P, groups, n).float()  # (P, G, n)

        # the reward model picks one response per group (first one on ties)
        pick = scores.argmax(-1, keepdim=True)  # (P, G, 1)
        rows.append(BestOfNRow(n=n, true_reward=hits.gather(-1, pick).mean().item(),
                               rm_score=scores.gather(-1, pick).mean().item(),
                               oracle_true_reward=hits.amax(-1).mean().item()))
    return rows


def _fitting(examples, tokenizer, max_seq_len: int, max_new_tokens: int) -> list:
    """The examples whose chat prompt leaves room for max_new_tokens."""
    from palmrl.data.chat import prompt_tokens

    return [ex for ex in examples if len(prompt_tokens(tokenizer, ex.prompt)) + max_new_tokens <= max_seq_len]


def best_of_n(policy, reward_model, tokenizer, prompts: Sequence[str], settings: ReportSettings) -> list[BestOfNRow]:
    """Sample max_n responses per prompt, score them with the reward model and the checker, tabulate."""
    from palmrl import tasks
    from palmrl.evaluate import respond
    from palmrl.reward import score_texts

    N = int(settings.max_n)
    ns = powers_of_two(N)
    repeated = [p for p in prompts for _ in range(N)]
    out = respond(policy, tokenizer, repeated, max_new_tokens=settings.max_new_tokens,
                  temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed)
    correct = torch.tensor(tasks.checker(repeated, out.texts)).view(len(prompts), N)  # (P, N)
    scores = score_texts(reward_model, tokenizer, repeated, out.texts,
                         max_len=reward_model.palm.config.max_seq_len).view(len(prompts), N)  # (P, N)
    return best_of_n_table(scores, correct, ns)


def greedy_samples(policies: dict, tokenizer, examples: Sequence, max_new_tokens: int) -> list[dict]:
    """Each policy's greedy response to the same prompts, with the checker's score."""
    from palmrl import tasks
    from palmrl.evaluate import respond

    prompts = [ex.prompt for ex in examples]
    rows = [{"prompt": ex.prompt, "expected": ex.output} for ex in examples]
    for name, model in policies.items():
        texts = respond(model, tokenizer, prompts, max_new_tokens=max_new_tokens).texts
        for row, text, score in zip(rows, texts, tasks.checker(prompts, texts)):
            row[name] = {"response": text, "score": score}
    return rows


def evaluate_policies(stages: dict[str, StageRun],
                      settings: ReportSettings) -> tuple[dict | None, list[dict], list[str]]:
    """Best-of-n of the final policy and greedy samples before/after RLHF: (best_of_n, samples, notes)."""
    from palmrl import checkpoint, tasks

    trust = settings.trust_remote_code
    notes: list[str] = []
    policy_names = [n for n in ("sft", *RL_STAGES) if n in stages and stages[n].manifest is not None]
    if not policy_names:
        return None, [], ["no sft/ or RL (ppo/, grpo/, dpo/) final checkpoint: no best-of-n, no samples"]
    ckpts = {n: checkpoint.load(stages[n].folder, key=n, stages=[n], trust_remote_code=trust) for n in policy_names}
    final = policy_names[-1]
    tokenizer = ckpts[final].tokenizer()
    for name in policy_names:
        if ckpts[name].manifest.get("tokenizer_sha256") != ckpts[final].manifest.get("tokenizer_sha256"):
            notes.append(f"{name}/ uses another tokenizer than {final}/: its samples are left out")
            ckpts.pop(name)
    policies = {name: checkpoint.model_from_checkpoint(c).eval() for name, c in ckpts.items()}

    # held-out prompts of the tasks the policy was trained on, that fit the model with the budget
    task_names = (ckpts[final].manifest.get("config", {}).get("data") or {}).get("tasks")
    wanted = max(int(settings.prompts), int(settings.samples))
    examples = tasks.make_examples(settings.split, wanted, seed=settings.seed, tasks=task_names) if wanted else []
    max_seq_len = min(m.config.max_seq_len for m in policies.values())
    fitting = _fitting(examples, tokenizer, max_seq_len, settings.max_new_tokens)
    if len(fitting) < len(examples):
        notes.append(f"{len(examples) - len(fitting)} of {len(examples)} prompts left out: too long for "
                     f"max_seq_len {max_seq_len} with max_new_tokens {settings.max_new_tokens}")

    samples = greedy_samples(policies, tokenizer, fitting[:settings.samples], settings.max_new_tokens)

    result = None
    reward = stages.get("reward")
    if settings.prompts <= 0:
        notes.append("best-of-n skipped (best_of_n.prompts=0)")
    elif reward is None or reward.manifest is None:
        notes.append("no reward/ final checkpoint: best-of-n needs a reward model")
    else:
        from palmrl.reward import reward_model_from_checkpoint

        rm_ckpt = checkpoint.load(reward.folder, key="reward", stages=["reward"], trust_remote_code=trust)
        if rm_ckpt.manifest.get("tokenizer_sha256") != ckpts[final].manifest.get("tokenizer_sha256"):
            notes.append(f"reward/ uses another tokenizer than {final}/: best-of-n skipped")
        elif not fitting:
            notes.append("no held-out prompt fits the model: best-of-n skipped")
        else:
            rm = reward_model_from_checkpoint(rm_ckpt)
            prompts = [ex.prompt for ex in fitting[:settings.prompts]]
            rows = best_of_n(policies[final], rm, tokenizer, prompts, settings)
            result = {"policy": final, "policy_checkpoint": str(ckpts[final].path),
                      "reward_checkpoint": str(rm_ckpt.path), "prompts": len(prompts), "split": settings.split,
                      "samples_per_prompt": settings.max_n, "temperature": settings.temperature,
                      "max_new_tokens": settings.max_new_tokens, "rows": [r._asdict() for r in rows]}
    return result, samples, notes


# ---------------------------------------------------------------------------------------------
# plots


def _figure(rows: int, cols: int, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg: no display, no pyplot state
    fig.suptitle(title, fontsize=13)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    return fig, list(axes)


def _line(ax, steps, values, label: str, *, marker: str = ".", **kwargs) -> bool:
    if not steps:
        return False
    ax.plot(steps, values, marker=marker, label=label, **kwargs)
    return True


def _finish(ax, title: str, xlabel: str, drew: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and iterations are whole numbers
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def _with_init(steps, values, init) -> tuple[list, list]:
    """Prepend the accuracy measured before the stage as step 0."""
    return ([0, *steps], [init, *values]) if init is not None else (steps, values)


def plot_pretrain(stage: StageRun, path: Path) -> Path:
    fig, (ax,) = _figure(1, 1, "pretrain")
    drew = _line(ax, *series(stage.metrics, "train", "loss"), "train", marker="")
    drew |= _line(ax, *series(stage.metrics, "val", "loss"), "val", marker="o")
    _, unigram = series(stage.metrics, "val", "unigram_loss")
    if unigram:
        ax.axhline(unigram[-1], color="grey", linestyle="--", label=f"unigram baseline {unigram[-1]:.3f}")
        drew = True
    ax.set_ylabel("loss (nats/token)")
    _finish(ax, "next-token loss vs the unigram baseline", "step", drew)
    fig.savefig(path, dpi=100)
    return path


def plot_sft(stage: StageRun, path: Path) -> Path:
    fig, (loss, acc) = _figure(1, 2, "SFT: supervised fine-tuning")
    drew = _line(loss, *series(stage.metrics, "train", "loss"), "train", marker="")
    drew |= _line(loss, *series(stage.metrics, "val", "loss"), "val", marker="o")
    _finish(loss, "loss (response tokens)", "step", drew)
    init = _number((stage.manifest or {}).get("init_accuracy"))
    drew = _line(acc, *_with_init(*series(stage.metrics, "val", "accuracy"), init), "checker accuracy", marker="o")
    drew |= _line(acc, *series(stage.metrics, "val", "format_rate"), "format rate", marker="s")
    acc.set_ylim(-0.05, 1.05)
    _finish(acc, "held-out (step 0 = before SFT)", "step", drew)
    fig.savefig(path, dpi=100)
    return path


def plot_reward(stage: StageRun, path: Path, chance: float) -> Path:
    fig, (loss, acc) = _figure(1, 2, "reward model")
    drew = _line(loss, *series(stage.metrics, "train", "loss"), "train", marker="")
    drew |= _line(loss, *series(stage.metrics, "val", "loss"), "val", marker="o")
    _finish(loss, "loss", "step", drew)
    drew = _line(acc, *series(stage.metrics, "train", "accuracy"), "train", marker="")
    drew |= _line(acc, *series(stage.metrics, "val", "accuracy"), "val (held-out)", marker="o")
    acc.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
    acc.set_ylim(-0.05, 1.05)
    _finish(acc, "accuracy", "step", True)
    fig.savefig(path, dpi=100)
    return path


def plot_ppo(stage: StageRun, path: Path, name: str = "PPO") -> Path:
    fig, axes = _figure(2, 3, f"{name}: RLHF over iterations")
    m = stage.metrics
    panels = (("true_reward", "true reward (checker on rollouts)"), ("reward", "RM reward (rollouts)"),
              ("kl", "KL to the SFT reference (nats/seq)"), ("entropy", "entropy (nats/token)"),
              ("response_tokens", "response tokens"))
    for ax, (key, title) in zip(axes, panels):
        _finish(ax, title, "iteration", _line(ax, *series(m, "train", key), key))
    ax = axes[5]
    manifest = stage.manifest or {}
    drew = False
    for key, label, marker in (("train_sampled_reward", "training prompts, sampled", "o"),
                               ("sampled_reward", "held-out, sampled", "s"), ("accuracy", "held-out, greedy", "^")):
        init = _number(manifest.get(f"init_{key}"))
        drew |= _line(ax, *_with_init(*series(m, "val", key), init), label, marker=marker)
    _finish(ax, f"true reward at evaluations (0 = before {name})", "iteration", drew)
    fig.savefig(path, dpi=100)
    return path


def plot_dpo(stage: StageRun, path: Path) -> Path:
    fig, (loss, acc, task) = _figure(1, 3, "DPO: preference optimisation")
    m = stage.metrics
    drew = _line(loss, *series(m, "train", "loss"), "train", marker="")
    drew |= _line(loss, *series(m, "val", "loss"), "held-out pairs", marker="o")
    _finish(loss, "loss", "step", drew)
    drew = _line(acc, *series(m, "train", "reward_accuracy"), "train", marker="")
    drew |= _line(acc, *series(m, "val", "reward_accuracy"), "held-out pairs", marker="o")
    acc.axhline(0.5, color="grey", linestyle="--", label="chance 0.5")
    acc.set_ylim(-0.05, 1.05)
    _finish(acc, "implicit reward accuracy", "step", True)
    manifest, drew = stage.manifest or {}, False
    for key, label, marker in (("sampled_reward", "true reward, sampled", "s"), ("accuracy", "greedy accuracy", "^"),
                               ("behaviour_rate", "behaviour rate, sampled", "o")):
        drew |= _line(task, *_with_init(*series(m, "val", key), _number(manifest.get(f"init_{key}"))), label,
                      marker=marker)
    task.set_ylim(-0.05, 1.05)
    _finish(task, "held-out task prompts (0 = before DPO)", "step", drew)
    fig.savefig(path, dpi=100)
    return path


def plot_rl(stages: dict[str, StageRun], path: Path) -> Path:
    """The RL stages on one page: held-out behaviour rate and true reward, training-prompt true reward,
    KL, over the share of each stage's training done (0 = the SFT policy they all start from)."""
    fig, axes = _figure(1, 4, "RL stages from the same SFT policy")
    panels = (("behaviour_rate", "behaviour rate (held-out, sampled)"), ("sampled_reward", "true reward (held-out)"),
              ("train_sampled_reward", "true reward (training prompts)"))
    for ax, (key, title) in zip(axes, panels):
        drew = False
        for name in RL_STAGES:
            if name not in stages:
                continue
            steps, values = series(stages[name].metrics, "val", key)
            total = max(steps) if steps else 1
            init = _number((stages[name].manifest or {}).get(f"init_{key}"))
            steps, values = _with_init([s / total for s in steps], values, init)
            drew |= _line(ax, steps, values, name)
        ax.set_ylim(-0.05, 1.05)
        _finish(ax, title, "share of training", drew)
    ax, drew = axes[3], False
    for name in ("ppo", "grpo"):
        if name in stages:
            steps, values = series(stages[name].metrics, "train", "kl")
            total = max(steps) if steps else 1
            drew |= _line(ax, [s / total for s in steps], values, name, marker="")
    _finish(ax, "KL to SFT on rollouts (nats/seq)", "share of training", drew)
    fig.savefig(path, dpi=100)
    return path


def plot_best_of_n(result: dict, path: Path) -> Path:
    fig, (ax,) = _figure(1, 1, f"best-of-n: {result['policy']} policy ranked by the reward model")
    rows = result["rows"]
    ns = [r["n"] for r in rows]
    ax.plot(ns, [r["true_reward"] for r in rows], marker="o", label="true reward of the RM's pick")
    ax.plot(ns, [r["oracle_true_reward"] for r in rows], marker="s", linestyle="--", label="oracle (any of n correct)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("checker score")
    twin = ax.twinx()
    twin.plot(ns, [r["rm_score"] for r in rows], marker="^", color="tab:green", label="RM score of the pick")
    twin.set_ylabel("reward-model score")
    lines, more = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    fig.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="outside lower center", ncols=2)
    ax.set_title(f"{result['prompts']} held-out prompts, {result['samples_per_prompt']} samples each, "
                 f"T={result['temperature']}", fontsize=9)
    ax.set_xlabel("n")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def plot_all(stages: dict[str, StageRun], summary: dict, result: dict | None, out_dir: Path) -> list[Path]:
    plots = []
    if "pretrain" in stages:
        plots.append(plot_pretrain(stages["pretrain"], out_dir / "pretrain.png"))
    if "sft" in stages:
        plots.append(plot_sft(stages["sft"], out_dir / "sft.png"))
    if "reward" in stages:
        plots.append(plot_reward(stages["reward"], out_dir / "reward.png", summary["reward"]["chance"]))
    for name in ("ppo", "grpo"):
        if name in stages:
            plots.append(plot_ppo(stages[name], out_dir / f"{name}.png", name.upper()))
    if "dpo" in stages:
        plots.append(plot_dpo(stages["dpo"], out_dir / "dpo.png"))
    if any(name in stages for name in RL_STAGES):
        plots.append(plot_rl(stages, out_dir / "rl.png"))
    if result is not None:
        plots.append(plot_best_of_n(result, out_dir / "best_of_n.png"))
    return plots


# ---------------------------------------------------------------------------------------------
# markdown, json, terminal


EVAL_HEADER = ("checkpoint", "task", "metric", "value")


def read_evaluations(run_dir: Path) -> list[dict]:
    """The results `palmrl eval` wrote into <run>/eval/ (one JSON per checkpoint), oldest first."""
    folder = Path(run_dir) / "eval"
    found = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            found.append({"name": path.stem, **data})
    return found


def eval_rows(evaluations: Sequence[dict]) -> list[tuple[str, str, str, str]]:
    rows = []
    for result in evaluations:
        for task, metrics in result["tasks"].items():
            for key, value in metrics.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and key not in ("examples", "tokens"):
                    rows.append((result["name"], f"{task} ({metrics.get('examples', metrics.get('tokens', ''))})",
                                 key, _f(value)))
    return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    escape = lambda s: str(s).replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(escape(c) for c in row) + " |" for row in rows)]


def best_of_n_rows(result: dict) -> list[tuple[str, str, str, str]]:
    return [(str(r["n"]), _f(r["true_reward"]), _f(r["rm_score"]), _f(r["oracle_true_reward"])) for r in result["rows"]]


BEST_OF_N_HEADER = ("n", "true reward of pick", "RM score of pick", "oracle (any correct)")


def sample_rows(samples: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    policies = [n for n in ("sft", *RL_STAGES) if samples and n in samples[0]]
    header = ["prompt", "expected", *(f"{p} (greedy)" for p in policies)]
    rows = [[s["prompt"], s["expected"], *(f"{s[p]['response']!r} [{s[p]['score']:.0f}]" for p in policies)]
            for s in samples]
    return header, rows


def markdown(data: dict, plots: Sequence[Path], out_dir: Path) -> str:
    lines = [f"# palmrl report: `{data['run_dir']}`", "",
             "Stages found: " + ", ".join(f"`{s}/`" for s in data["stages"]) + ".", "",
             "## Key metrics", "",
             *_md_table(("stage", "metric", "value", "compare with"), key_rows(data["stages"])), ""]
    rl = rl_rows(data["stages"])
    if rl:
        lines += ["## RL stages side by side", "",
                  "Each from the same SFT policy (before → after); the behaviour is closing the answer with "
                  "\"Hope this helps!\" (`palmrl.tasks.behaviour`), the true reward is the task checker's, sampled.",
                  "",
                  *_md_table(RL_HEADER, rl), ""]
    phases = phase_rows(data["stages"])
    if phases:
        lines += ["## Where an RL iteration's time goes", "",
                  "Median seconds per iteration (the first, a warm-up, left out) from the stage's `time_*_s` metrics.",
                  "", *_md_table(PHASE_HEADER, phases), ""]
    result = data["best_of_n"]
    if result is not None:
        lines += ["## Best-of-n", "",
                  f"{result['samples_per_prompt']} samples per prompt from the `{result['policy']}` policy "
                  f"(T={result['temperature']}) on {result['prompts']} held-out `{result['split']}` task prompts; the "
                  "reward model picks the best of each n, the task checker scores the pick.", "",
                  *_md_table(BEST_OF_N_HEADER, best_of_n_rows(result)), ""]
    if data["samples"]:
        header, rows = sample_rows(data["samples"])
        lines += ["## Samples before/after RLHF", "",
                  "Greedy responses to the same held-out prompts; [1] = correct by the task checker.", "",
                  *_md_table(header, rows), ""]
    if data.get("evaluations"):
        lines += ["## Evaluations (`palmrl eval`)", "",
                  "From `eval/*.json` in the run folder (task (examples or tokens), metric, value).", "",
                  *_md_table(EVAL_HEADER, eval_rows(data["evaluations"])), ""]
    if data["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in data["notes"]), ""]
    lines += ["## Plots", ""]
    for plot in plots:
        rel = plot.relative_to(out_dir).as_posix()
        lines += [f"### {plot.stem}", "", f"![{plot.stem}]({rel})", ""]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_report(run_dir: Path, out_dir: Path | None = None, settings: ReportSettings = ReportSettings()) -> Report:
    """Read the run, evaluate its policies, draw the plots, write report.md and report.json."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    stages = find_stages(run_dir)
    summary = summarise(stages)
    result, samples, notes = evaluate_policies(stages, settings)

    # write: stale plots of stages that are gone must not linger in the folder
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_NAMES:
        (out_dir / name).unlink(missing_ok=True)
    plots = plot_all(stages, summary, result, out_dir)
    data = {"run_dir": str(run_dir), "stages": summary, "best_of_n": result, "samples": samples, "notes": notes,
            "plots": [p.name for p in plots], "settings": asdict(settings),
            "evaluations": read_evaluations(run_dir)}
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    md_path.write_text(markdown(data, plots, out_dir))
    json_path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return Report(md_path, json_path, plots, data)


def print_report(data: dict, console=None) -> None:
    """The report's tables, rich-formatted for the terminal."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(highlight=False)
    cells = lambda row: [Text(str(c)) for c in row]  # noqa: E731  (responses may hold "[...]": no markup)
    table = Table(title=f"palmrl report: {data['run_dir']}", title_justify="left")
    for column in ("stage", "metric", "value", "compare with"):
        table.add_column(column, style="bold cyan" if column == "stage" else None)
    for row in key_rows(data["stages"]):
        table.add_row(*cells(row))
    console.print(table)
    for title, header, rows in (
            ("RL stages side by side (from the same SFT policy: before → after)", RL_HEADER, rl_rows(data["stages"])),
            ("where an RL iteration's time goes (median seconds)", PHASE_HEADER, phase_rows(data["stages"])),
            ("evaluations (palmrl eval)", EVAL_HEADER, eval_rows(data.get("evaluations") or []))):
        if rows:
            table = Table(title=title, title_justify="left")
            for column in header:
                table.add_column(column)
            for row in rows:
                table.add_row(*cells(row))
            console.print(table)
    if data["best_of_n"] is not None:
        result = data["best_of_n"]
        table = Table(title=f"best-of-n ({result['policy']} policy, {result['prompts']} held-out prompts)",
                      title_justify="left")
        for column in BEST_OF_N_HEADER:
            table.add_column(column, justify="right")
        for row in best_of_n_rows(result):
            table.add_row(*cells(row))
        console.print(table)
    if data["samples"]:
        header, rows = sample_rows(data["samples"])
        table = Table(title="samples before/after RLHF (greedy, [1] = correct)", title_justify="left")
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*cells(row))
        console.print(table)
    for note in data["notes"]:
        console.print(Text.assemble(("note: ", "yellow"), note))
