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


@pytest.mark.parametrize("key,value", [("depth", 10**9), ("dim", 2**40), ("vocab_size", 2**62), ("heads", 2**31),
                                       ("ff_mult", 10**12)])
def test_model_yaml_sizes_are_checked_against_the_weights_before_anything_is_allocated(pristine, tmp_path, key, value):
    """A model.yaml whose sizes were edited (hashes made to agree) is refused from the weights' header:
    building depth 10**9 first exhausted the machine's memory (found by the fuzz above)."""
    import hashlib
    import json
    import resource
    import shutil

    import yaml

    from palmrl import checkpoint
    from palmrl.errors import UserError

    folder = tmp_path / "final"
    shutil.copytree(pristine, folder)
    config = yaml.safe_load((folder / "model.yaml").read_text())
    config[key] = value
    text = yaml.safe_dump(config)
    (folder / "model.yaml").write_text(text)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.yaml"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match=key if key in ("depth", "dim", "vocab_size") else "shape"):
        checkpoint.model_from_checkpoint(checkpoint.load(folder))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024  # KiB: nothing big was built


def test_a_lora_rank_edited_in_the_manifest_is_refused_before_the_adapters_are_built(tmp_path):
    import json

    import torch

    from palmrl import checkpoint
    from palmrl.errors import UserError
    from palmrl.model.lora import LoRAConfig, add_lora
    from palmrl.model.palm import ModelConfig, PaLM
    from palmrl.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    model = PaLM(config)
    spec = LoRAConfig(rank=4, alpha=8.0)
    add_lora(model, "actor", spec)
    weights, adapters = checkpoint.export_split({k: v.detach() for k, v in model.state_dict().items()})
    lora = {"scopes": {"actor": {"rank": 4, "alpha": 8.0, "targets": list(spec.targets)}}, "active": "actor"}
    folder = checkpoint.save(tmp_path / "final", stage="sft", step=0, weights=weights, adapters=adapters,
                             model_config=config.to_dict(), tokenizer=tokenizer, config={}, extra={"lora": lora})
    loaded = checkpoint.model_from_checkpoint(checkpoint.load(folder))  # as saved: loads
    assert torch.equal(loaded.layers[0].fused_proj.lora_A["actor"], model.layers[0].fused_proj.lora_A["actor"])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["lora"]["scopes"]["actor"]["rank"] = 10**9
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="rank 1000000000 but adapters.safetensors holds rank 4"):
        checkpoint.model_from_checkpoint(checkpoint.load(folder))
