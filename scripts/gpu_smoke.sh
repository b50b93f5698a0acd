#!/usr/bin/env bash
# The GPU smoke test: every stage on CUDA in bf16, then palm_1b's step numbers. One GPU, < 8 minutes.
#
#   scripts/gpu_smoke.sh                 # makes .venv-gpu with a CUDA torch (needs the PyTorch index)
#   PYTHON=/path/to/python scripts/gpu_smoke.sh   # an environment that already has CUDA torch + palmrl
#
# 1. install (skipped with PYTHON=): torch $TORCH_VERSION from $TORCH_INDEX, then palmrl at the tested pins
# 2. on CUDA, bf16: tokenizer → pretrain → sft → reward → ppo (LoRA) through `palmrl pipeline`, then ppo
#    with lora=none, a LoRA reward model and ppo on its shared base, `palmrl sample` best-of-n with the
#    reward model, and one request to `palmrl serve`
# 3. scripts/gpu_step.py: the flash kernel in training (asserted), MFU and peak memory of a palm_1b
#    step at seq 2048 beside `palmrl plan`'s estimate
# Output: the table of step 3 and each stage's line; exit non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
TORCH_VERSION=${TORCH_VERSION:-$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml','rb'))['tool']['palmrl']['tested']['torch'])")}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
WORK=${WORK:-$(mktemp -d /tmp/palmrl-gpu-smoke.XXXX)}
export WANDB_MODE=disabled PALMRL_CACHE_DIR="$WORK/cache"
step() { echo "[gpu_smoke $(( $(date +%s) - START ))s] $*"; }

if [[ -z "${PYTHON:-}" ]]; then
  step "install: torch $TORCH_VERSION from $TORCH_INDEX into .venv-gpu"
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
  python3 -c "import tomllib; t = tomllib.load(open('pyproject.toml','rb'))['tool']['palmrl']['tested']; \
print('\n'.join(f'{k}=={v}' for k, v in t.items() if k != 'torch'))" > .venv-gpu/constraints.txt
  echo "torch==$TORCH_VERSION" >> .venv-gpu/constraints.txt
  .venv-gpu/bin/pip install -q -c .venv-gpu/constraints.txt -e .
  PYTHON=.venv-gpu/bin/python
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_bf16_supported())"
PALMRL=("$PYTHON" -m palmrl)

step "pipeline on CUDA, bf16 (tokenizer, pretrain, sft, reward, ppo with LoRA, report)"
(cd "$WORK" && "${PALMRL[@]}" pipeline run_name=gpu precision=bf16 \
  pretrain.train.max_steps=200 sft.train.max_steps=150 reward.train.max_steps=100 ppo.train.max_steps=10 \
  ppo.train.eval_examples=64 sft.train.eval_examples=64)
RUN="$WORK/runs/gpu"
"$PYTHON" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
for stage in ("pretrain", "sft", "reward", "ppo"):
    manifest = json.loads((Path(sys.argv[1]) / stage / "final" / "manifest.json").read_text())
    assert manifest["config"]["precision"] == "bf16", (stage, manifest["config"]["precision"])
    print(f"  {stage:<8} ok  {json.dumps(manifest.get('metrics', {}))[:150]}")
EOF

step "ppo with lora=none (reference and reward model outside the engine, on the GPU)"
(cd "$WORK" && "${PALMRL[@]}" ppo policy="$RUN/sft" reward="$RUN/reward" lora=none precision=bf16 \
  train.max_steps=3 train.eval_every=0 train.eval_examples=16 out_dir="$RUN/ppo_full")

step "reward with LoRA on the SFT policy (palmrl reward's default), then ppo sharing that base (its head on the bf16 trunk)"
(cd "$WORK" && "${PALMRL[@]}" reward init_from="$RUN/sft" lora=r8 precision=bf16 train.max_steps=20 \
  train.eval_every=0 out_dir="$RUN/reward_lora")
(cd "$WORK" && "${PALMRL[@]}" ppo policy="$RUN/sft" reward="$RUN/reward_lora" precision=bf16 \
  train.max_steps=3 train.eval_every=0 train.eval_examples=16 out_dir="$RUN/ppo_shared")

step "sample best-of-n with the reward model (device=auto → cuda, bf16)"
(cd "$WORK" && "${PALMRL[@]}" sample ckpt="$RUN/ppo" reward="$RUN/reward" best_of_n=true num_samples=4 \
  prompt="What is the capital of France?" max_new_tokens=24 format=jsonl) | tee "$WORK/sample.jsonl"
"$PYTHON" -c "import json,sys; r=[json.loads(l) for l in open('$WORK/sample.jsonl')]; \
assert len(r) == 1 and len(r[0]['all_scores']) == 4, r"

step "serve: one chat request"
PORT=${PORT:-8765}
(cd "$WORK" && "${PALMRL[@]}" serve ckpt="$RUN/ppo" port="$PORT" > "$WORK/serve.log" 2>&1) &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$PYTHON" - "$PORT" <<'EOF'
import json, sys, time, urllib.request
port = sys.argv[1]
for _ in range(120):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        break
    except OSError:
        time.sleep(1)
body = json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60))
print("  serve ok:", reply["choices"][0]["message"]["content"][:80])
EOF
kill $SERVER; trap - EXIT

step "palm_1b step at seq 2048: flash kernel, MFU, peak memory vs plan"
"$PYTHON" scripts/gpu_step.py --micro-batch "${MICRO_BATCH:-8}" --checkpointing
step "done in $(( $(date +%s) - START )) s (work folder $WORK)"
