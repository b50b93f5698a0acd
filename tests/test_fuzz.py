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
