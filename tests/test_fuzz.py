"""Fuzz the config boundary: any value for any numeric or string key of any stage, through the real
CLI entry (Hydra composition, type checks against the YAML defaults, the typed training sections),
with the stage itself replaced by a no-op. Property: exit 0, or exit 2 with exactly one
`palmrl: error:` line; never a traceback (exit 1)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import compose

pytestmark = pytest.mark.unit

STAGES = ["pretrain", "sft", "reward", "ppo", "sample", "serve", "dedup", "selfinstruct", "tokenizer", "report"]


def leaf_keys(stage: str) -> list[str]:
    """Dotted keys whose default is a number or a string (where typos and bad values land)."""
    tree = OmegaConf.to_container(compose(stage), resolve=False)
    keys = []

    def walk(node, path):
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict):
                walk(value, dotted)
            elif isinstance(value, (int, float, str)) and not isinstance(value, bool) and key != "hydra":
                keys.append(dotted)
    walk({k: v for k, v in tree.items() if k != "hydra"}, "")
    return keys


KEYS = {stage: leaf_keys(stage) for stage in STAGES}
VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1e400", "nan", "inf", "-inf", "null", "''", "true", "..", "[]", "{}", "abc",
                     "2", "1e-9", str(2**64), "'x y'", "[1,2]"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f) if math.isfinite(f) else str(f)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_override_value_is_accepted_or_one_line_exit_2(data, monkeypatch, capsys, tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    import palmrl.cli as cli

    stage = data.draw(st.sampled_from(STAGES))
    key = data.draw(st.sampled_from(KEYS[stage]))
    value = data.draw(VALUES)
    monkeypatch.setattr(cli, "stage_runner", lambda name: (lambda cfg: None))
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    code = 0
    try:
        cli.main([stage, f"{key}={value}", f"out_dir={tmp_path / 'out'}" if stage in STAGES[:4] else "seed=0"])
    except SystemExit as exit_:
        code = exit_.code or 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("palmrl: error:")]
    assert code in (0, 2), (stage, key, value, code, err[-1500:])
    if code == 2:
        assert len(errors) == 1 and "Traceback" not in err, (stage, key, value, err[-1500:])


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from test_serve import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("fuzz-ckpt"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["manifest", "model.yaml"]), key=st.text(min_size=1, max_size=12) | st.sampled_from(
    ["stage", "files", "tokenizer_sha256", "lora", "parent", "step", "dim", "depth", "vocab_size", "heads",
     "family", "hf_config", "source"]), value=JSON_VALUES)
def test_mutated_checkpoint_metadata_loads_or_is_one_user_error(pristine, tmp_path_factory, where, key, value):
    """Any field of manifest.json or model.yaml replaced by any JSON value (hashes made to agree, as an
    attacker would): loading the checkpoint and building its model either works or raises UserError."""
    import hashlib
    import json
    import shutil

    import yaml

    from palmrl import checkpoint
    from palmrl.errors import UserError

    folder = tmp_path_factory.mktemp("mutant") / "final"
    shutil.copytree(pristine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if where == "manifest":
        manifest[key] = value
    else:
        config = yaml.safe_load((folder / "model.yaml").read_text())
        config[key] = value
        text = yaml.safe_dump(config)
        (folder / "model.yaml").write_text(text)
        manifest["files"]["model.yaml"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    try:
        ckpt = checkpoint.load(folder)
        ckpt.tokenizer()
        checkpoint.model_from_checkpoint(ckpt)
    except UserError:
        pass
