"""Nothing a checkpoint folder says runs code or changes a model unchecked (issue: code execution on load).

A checkpoint's model.yaml is hashed in its manifest and verified before it is read; an HF-based
checkpoint that names its own modelling code (auto_map) loads only with trust_remote_code=true on
the command line, never because a file asks for it; a manifest without tokenizer_sha256 is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from test_serve import tiny_checkpoint

from conftest import palmrl_cli

pytestmark = pytest.mark.unit

PAYLOAD = '''
from pathlib import Path
Path(__file__).with_name("PWNED").write_text("remote code ran")
'''


def rewrite(folder: Path, name: str, text: str) -> None:
    """Edit a file and, as an attacker would, make the manifest agree with it."""
    (folder / name).write_text(text)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_model_yaml_edits_that_keep_shapes_are_refused(tmp_path):
    from palmrl import checkpoint
    from palmrl.errors import UserError

    folder = tiny_checkpoint(tmp_path / "run")
    config = yaml.safe_load((folder / "model.yaml").read_text())
    config["rotary_base"] = 500.0  # same tensor shapes, different outputs
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="model.yaml does not match its sha256"):
        checkpoint.load(folder)


def test_checkpoint_code_never_runs_because_the_folder_asks(tmp_path):
    """The probe's case: an HF-style model.yaml with auto_map and trust_remote_code, a modeling file
    beside it, the manifest's hashes made to agree. `palmrl sample` must refuse, run nothing."""
    folder = tiny_checkpoint(tmp_path / "run")
    (folder / "modeling_custom.py").write_text(PAYLOAD)
    (folder / "configuration_custom.py").write_text(PAYLOAD)
    hf_config = {"model_type": "custom", "vocab_size": 263, "hidden_size": 32, "max_position_embeddings": 64,
                 "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                              "AutoModelForCausalLM": "modeling_custom.CustomModel"},
                 "_name_or_path": str(folder)}
    rewrite(folder, "model.yaml", yaml.safe_dump({"family": "hf", "hf_config": hf_config,
                                                  "source": {"path": str(folder), "trust_remote_code": True}}))
    proc = palmrl_cli("sample", f"ckpt={folder}", "prompt=hi", "max_new_tokens=2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trust_remote_code=true" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (folder / "PWNED").exists()


def test_a_manifest_without_the_model_yaml_hash_or_tokenizer_hash_is_refused(tmp_path):
    from palmrl import checkpoint
    from palmrl.errors import UserError

    folder = tiny_checkpoint(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["model.yaml"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="model.yaml is not listed"):
        checkpoint.load(folder)

    folder = tiny_checkpoint(tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["tokenizer_sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no tokenizer_sha256"):
        checkpoint.load(folder).tokenizer()


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['touch PWNED']\n", "[unclosed\n", "- a list\n"])
def test_malformed_model_yaml_is_one_line(tmp_path, text):
    folder = tiny_checkpoint(tmp_path / "run")
    rewrite(folder, "model.yaml", text)
    proc = palmrl_cli("sample", f"ckpt={folder}", "prompt=hi", "max_new_tokens=2", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "model.yaml" in proc.stderr and not (tmp_path / "PWNED").exists()
