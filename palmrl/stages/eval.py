"""`palmrl eval ckpt=… [tasks=[checker,qa,perplexity]]`: score a checkpoint on tasks and write the results.

    checker     the embedded instruction tasks' held-out (test) prompts, greedy replies scored by the
                task checker: accuracy overall and per task, format rate, reply length (what SFT and
                the RL stages report, computed the same way: palmrl.evaluate)
    qa          your JSONL of {prompt, answer}: the greedy reply scored by exact match (case, surrounding
                spaces and a final period ignored), or by `qa.reward_fn` (an importable
                (prompts, responses) -> scores, e.g. palmrl.tasks.checker) on {prompt} records
    perplexity  a text file: mean negative log-likelihood per token and its exp, over consecutive
                windows of the model's context

    harness     lm-evaluation-harness tasks (`harness=hellaswag` or `harness=[my_task]` with
                `harness_options.include_path=<a folder of task YAMLs>`), run by lm-eval on the
                checkpoint exported as a Hugging Face folder (checkpoints started from model=hf;
                `pip install lm-eval`)

Results go to <out_dir>/<checkpoint name>.json and .md (out_dir: runs/<run_name>/eval), one file
per checkpoint, so several checkpoints evaluated into one run compare side by side, and
`palmrl report runs/<run_name>` shows them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from palmrl import checkpoint, tasks
from palmrl.errors import UserError
from palmrl.evaluate import respond, task_score
from palmrl.io import read_jsonl, write_atomic
from palmrl.runtime import inference_placement, seed_everything
from palmrl.tracking import Tracker

TASKS = ("checker", "qa", "perplexity")


def normalise_answer(text: str) -> str:
    """What exact match compares: lower case, inner whitespace collapsed, a final period dropped."""
    return re.sub(r"\s+", " ", text.strip().lower()).removesuffix(".").strip()


def checker_results(model, tokenizer, cfg: DictConfig) -> dict:
    names = list(cfg.tasks) if cfg.get("tasks") else None
    examples = tasks.make_examples("test", int(cfg.examples), seed=0, tasks=names)
    score = task_score(model, tokenizer, examples, max_new_tokens=int(cfg.max_new_tokens), keep_samples=len(examples))
    by_task: dict[str, list[float]] = {}
    for example, sample in zip(examples, score.samples):
        by_task.setdefault(example.task, []).append(sample["score"])
    return {"examples": len(examples), "accuracy": score.accuracy, "format_rate": score.format_rate,
            "mean_length": score.mean_length,
            "per_task": {name: sum(s) / len(s) for name, s in sorted(by_task.items())},
            "samples": score.samples[:8]}


def qa_records(path: str, *, need_answer: bool) -> list[dict]:
    records = []
    for number, record in read_jsonl(Path(path), key="qa.path"):
        where = f"{path}:{number}"
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UserError(f"{where}: expected a non-empty \"prompt\" string")
        if need_answer and not isinstance(record.get("answer"), str):
            raise UserError(f"{where}: expected an \"answer\" string (or set qa.reward_fn to score without one)")
        records.append(record)
    if not records:
        raise UserError(f"qa.path: {path} holds no records")
    return records


def qa_results(model, tokenizer, cfg: DictConfig, records: list[dict]) -> dict:
    prompts = [r["prompt"] for r in records]
    out = respond(model, tokenizer, prompts, max_new_tokens=int(cfg.max_new_tokens))
    if cfg.get("reward_fn"):
        from palmrl.rlhf import load_reward_fn

        scores = [float(s) for s in load_reward_fn(str(cfg.reward_fn))(prompts, out.texts)]
        metric = "reward"
    else:
        scores = [float(normalise_answer(text) == normalise_answer(r["answer"])) for text, r in zip(out.texts, records)]
        metric = "exact_match"
    n = len(records)
    return {"examples": n, "metric": metric, metric: sum(scores) / n, "format_rate": sum(out.well_formed) / n,
            "samples": [{"prompt": p, "response": t, "score": s} for p, t, s in zip(prompts, out.texts, scores)][:8]}


@torch.no_grad()
def perplexity_results(model, tokenizer, cfg: DictConfig, device: torch.device) -> dict:
    path = Path(str(cfg.path))
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"perplexity.path: no such file: {path}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"perplexity.path: {path} is not UTF-8 text (byte {err.start})") from None
    ids = [tokenizer.bos_id, *tokenizer.encode(text)][: int(cfg.max_tokens) + 1]
    if len(ids) < 2:
        raise UserError(f"perplexity.path: {path} holds no text")
    window = int(model.config.max_seq_len)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):  # consecutive windows; each predicts its own tokens
        chunk = torch.tensor([ids[start:start + window + 1]], device=device)
        logits = model(chunk[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + nll.item(), count + chunk.shape[1] - 1
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count), "file": str(path)}


def harness_results(ckpt: checkpoint.Checkpoint, names: list[str], cfg: DictConfig, device: torch.device) -> dict:
    """lm-evaluation-harness on the checkpoint exported (LoRA merged) to a temporary HF folder:
    {task: {metric: value}} from lm-eval's results."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("harness: lm-evaluation-harness is not installed (pip install lm-eval)") from None
    from palmrl.model.registry import config_from_dict

    if getattr(config_from_dict(ckpt.model_config), "family", None) != "hf":
        raise UserError(f"harness: {ckpt.path} is a PaLM checkpoint; lm-eval loads a Hugging Face folder, which only "
                        f"checkpoints started from model=hf export to (checker, qa and perplexity work on any)")
    include = cfg.get("include_path")
    if include and not Path(str(include)).is_dir():
        raise UserError(f"harness_options.include_path: {include} is not a folder of task YAMLs")
    import tempfile

    model, _ = checkpoint.policy_from_checkpoint(ckpt)
    with tempfile.TemporaryDirectory(prefix="palmrl-harness-") as tmp:
        folder = checkpoint.export_hf(model, ckpt.tokenizer(), Path(tmp) / "hf")
        del model
        # your own tasks alone first: indexing lm-eval's thousands of built-in task YAMLs takes minutes
        manager = TaskManager(include_path=str(include), include_defaults=False) if include else None
        if manager is None or any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=str(include) if include else None)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise UserError(f"harness: lm-eval knows no task {unknown[0]!r} (add harness_options.include_path=<folder "
                            f"of task YAMLs> for your own)")
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                      tasks=list(names), num_fewshot=cfg.get("num_fewshot"), limit=cfg.get("limit"),
                                      batch_size=int(cfg.get("batch_size") or 8), device=str(device),
                                      task_manager=manager, log_samples=False)
    return {task: {metric.replace(",none", ""): value for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in (out or {}).get("results", {}).items()}


def markdown(name: str, results: dict) -> str:
    lines = [f"# palmrl eval: `{name}`", "", f"checkpoint `{results['checkpoint']['path']}` "
             f"({results['checkpoint']['stage']}, step {results['checkpoint']['step']})", "",
             "| task | metric | value |", "|---|---|---|"]
    for task, metrics in results["tasks"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"| {task} | {key} | {value:.4f} |" if isinstance(value, float) else
                             f"| {task} | {key} | {value} |")
        for sub, value in (metrics.get("per_task") or {}).items():
            lines.append(f"| {task} | accuracy: {sub} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> Path:
    seed_everything(int(cfg.seed))
    chosen = list(cfg.tasks or []) if not isinstance(cfg.tasks, str) else [cfg.tasks]
    harness = cfg.get("harness") or []
    harness = [str(harness)] if isinstance(harness, str) else [str(h) for h in harness]
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not (chosen or harness):
        raise UserError(f"tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}" if unknown
                        else f"tasks: give at least one of {', '.join(TASKS)}")
    # the cheap checks first: the files each task reads, then the checkpoint and the model
    if "qa" in chosen and not cfg.qa.get("path"):
        raise UserError("qa.path: the qa task needs a JSONL file of {prompt, answer} (qa.path=qa.jsonl)")
    if "perplexity" in chosen and not cfg.perplexity.get("path"):
        raise UserError("perplexity.path: the perplexity task needs a text file (perplexity.path=book.txt)")
    qa = qa_records(str(cfg.qa.path), need_answer=not cfg.qa.get("reward_fn")) if "qa" in chosen else None
    if "qa" in chosen and cfg.qa.get("reward_fn"):
        from palmrl.rlhf import load_reward_fn

        load_reward_fn(str(cfg.qa.reward_fn))
    ckpt = checkpoint.load(cfg.ckpt, key="ckpt", trust_remote_code=bool(cfg.trust_remote_code))
    if ckpt.stage == "reward":
        raise UserError(f"ckpt: {ckpt.path} is a reward checkpoint; palmrl eval scores policies "
                        f"(its held-out pairwise accuracy is in its manifest's metrics)")
    tokenizer = ckpt.tokenizer()
    device, dtype = inference_placement(str(cfg.device), str(cfg.precision))
    model = checkpoint.model_from_checkpoint(ckpt).eval().to(device=device, dtype=dtype)

    results: dict = {"checkpoint": ckpt.lineage(), "tasks": {}}
    if "checker" in chosen:
        results["tasks"]["checker"] = checker_results(model, tokenizer, cfg.checker)
    if qa is not None:
        results["tasks"]["qa"] = {**qa_results(model, tokenizer, cfg.qa, qa), "file": str(cfg.qa.path)}
    if "perplexity" in chosen:
        results["tasks"]["perplexity"] = perplexity_results(model, tokenizer, cfg.perplexity, device)
    if harness:
        del model
        for task, metrics in harness_results(ckpt, harness, cfg.harness_options, device).items():
            results["tasks"][f"harness:{task}"] = metrics

    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = ckpt.short_name("-")
    write_atomic(out_dir / f"{name}.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out_dir / f"{name}.md", markdown(name, results))
    rows = {f"{task} {key}": value for task, metrics in results["tasks"].items() for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
    Tracker(out_dir, enabled=True, total_steps=0, stage="eval").summary(f"palmrl eval: {name}", {
        **rows, "results": str(out_dir / f"{name}.json")})
    return out_dir / f"{name}.json"
