"""Every YAML in configs/ composes, every model config builds, and the CLI table matches the stage configs."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Literal

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from palmrl.cli import STAGES
from palmrl.model.palm import ModelConfig, PaLM

from conftest import CONFIG_DIR, compose

pytestmark = pytest.mark.unit

STAGE_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONFIG_DIR.iterdir() if g.is_dir()}


def test_cli_table_matches_stage_configs():
    assert set(STAGES) == set(STAGE_FILES)


def test_pipeline_docs_list_the_stage_overrides_configs_pipeline_yaml_holds():
    """docs/pipeline.md's table of default stage_overrides is configs/pipeline.yaml's, row for row."""
    overrides = yaml.safe_load((CONFIG_DIR / "pipeline.yaml").read_text())["stage_overrides"]
    doc = (CONFIG_DIR.parent / "docs" / "pipeline.md").read_text()
    table = dict(re.findall(r"^\| (\w+) \| `([^`]*)` \|$", doc.split("| stage | overrides |", 1)[1].split("\n\n", 1)[0],
                            flags=re.M))
    assert table == {stage: " ".join(args) for stage, args in overrides.items() if args}


@pytest.mark.parametrize("stage", STAGE_FILES)
def test_stage_config_composes_and_starts_with_its_command(stage):
    cfg = compose(stage)
    assert cfg.stage == stage
    first = (CONFIG_DIR / f"{stage}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# palmrl {stage}"), f"{stage}.yaml must start with the command that runs it"


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    stage = {"generator": "selfinstruct", "lora": "sft"}.get(group, "pretrain")
    cfg = compose(stage, [f"{group}={option}"])
    if group == "experiment":  # presets are global (# @package _global_): they set keys across groups
        assert cfg.plan.gpus > 1 and cfg.model.dim >= 2048
        return
    node = OmegaConf.to_container(cfg[group], resolve=False)
    assert node, f"{group}/{option} is empty"


@pytest.mark.parametrize("name", [n for n in GROUPS["model"] if n != "hf"])  # hf: a pointer to a model (test_hf.py)
def test_model_configs_build_on_meta(name):
    fields = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    config = ModelConfig.from_dict(fields)
    with torch.device("meta"):
        model = PaLM(config)
    assert model.num_params() > 0


@pytest.mark.parametrize("name,paper", [("palm_8b", 8.63e9), ("palm_62b", 62.50e9), ("palm_540b", 540.35e9)])
def test_paper_sizes(name, paper):
    config = ModelConfig.from_dict(yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text()))
    with torch.device("meta"):
        params = PaLM(config).num_params()
    assert abs(params - paper) / paper < 0.05, f"{name}: {params / 1e9:.2f}B vs paper {paper / 1e9:.1f}B"


def test_palm_1b_pile_stage3_composes():
    cfg = compose("pretrain", ["model=palm_1b", "data=pile", "zero=stage3"])
    assert cfg.zero.stage == 3 and cfg.data.streaming and cfg.model.dim > 1000


def test_pipeline_routes_stage_overrides_without_the_environment():
    from palmrl.stages.pipeline import route_overrides

    before = dict(os.environ)
    kept, routed = route_overrides(["run_name=x", "sft.lora=r16", "ppo.ppo.kl_coef=0.1", "+sft.extra=1", "model=palm_small"])
    assert kept == ["run_name=x", "+sft.extra=1", "model=palm_small"]
    assert routed == {"sft": ["lora=r16"], "ppo": ["ppo.kl_coef=0.1"]}
    assert dict(os.environ) == before


@pytest.mark.unit
def test_typed_sections_check_types_ranges_and_name_the_key():
    from palmrl.config import Invalid, OptimConfig, TrainConfig, typed
    from palmrl.errors import UserError

    @dataclasses.dataclass(frozen=True)
    class Section:
        lr: float
        steps: int
        mode: Literal["a", "b"] = "a"
        clip: float | None = None
        betas: tuple[float, ...] = (0.9,)

        def __post_init__(self):
            if self.steps < 1:
                raise Invalid("steps", f"must be >= 1, got {self.steps}")

    made = typed(Section, {"lr": 1, "steps": 3, "betas": [0, 1], "other": "ignored"}, key="s")
    assert made == Section(lr=1.0, steps=3, betas=(0.0, 1.0)) and isinstance(made.lr, float)
    for values, message in [({"lr": float("nan"), "steps": 1}, "s.lr: must be a finite number"),
                            ({"lr": float("inf"), "steps": 1}, "s.lr: must be a finite number"),
                            ({"lr": "fast", "steps": 1}, "s.lr: expected a number"),
                            ({"lr": 1, "steps": 2.5}, "s.steps: expected an integer"),
                            ({"lr": 1, "steps": True}, "s.steps: expected an integer"),
                            ({"lr": 1, "steps": 1, "mode": "c"}, "s.mode: must be one of a, b"),
                            ({"lr": 1, "steps": 1, "clip": "x"}, "s.clip: expected a number"),
                            ({"lr": 1, "steps": 0}, "s.steps: must be >= 1, got 0"),
                            ({"lr": 1}, "s: ")]:
        with pytest.raises(UserError, match=re.escape(message)):
            typed(Section, values, key="s")
    # the shared sections as every training stage composes them
    cfg = compose("sft", ["optim.lr=0.01"])
    assert typed(OptimConfig, cfg.optim, key="optim").lr == 0.01
    assert typed(TrainConfig, cfg.train, key="train").max_steps == cfg.train.max_steps
