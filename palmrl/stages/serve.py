"""`palmrl serve ckpt=… [ckpt_b=…] [feedback_dir=…]`: an OpenAI-compatible HTTP server and a web page
to chat with checkpoints, compare them blind and label preferences (FastAPI + uvicorn).

Builds an engine and batching server per checkpoint, the labelling log and queue, and the app
(palmrl/serving/app.py, ui.py), checks the port is free and the token policy, then hands over to
uvicorn until Ctrl-C.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from palmrl.errors import UserError
from palmrl.runtime import seed_everything
from palmrl.selfinstruct.filters import dataclass_from_cfg
from palmrl.serving.app import Limits, Server, build_app
from palmrl.serving.feedback import Feedback, PromptQueue, check_feedback_dir, load_prompts
from palmrl.serving.generator import Engine
from palmrl.serving.scheduler import Batching
from palmrl.tracking import console

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"port: cannot listen on {host}:{port} ({err.strerror}); choose another port=...") from None


def served_checkpoints(cfg: DictConfig) -> list[tuple[str, str]]:
    """(config key, path) of every checkpoint to serve: ckpt, then ckpt_b, then compare=[...]."""
    found = [("ckpt", str(cfg.ckpt))]
    if cfg.get("ckpt_b"):
        found.append(("ckpt_b", str(cfg.ckpt_b)))
    extra = cfg.get("compare") or []
    if isinstance(extra, str) or not isinstance(extra, Sequence):
        raise UserError(f"compare must be a list of checkpoint folders, e.g. compare=[runs/a/sft,runs/a/ppo]; "
                        f"got {extra!r}")
    found += [(f"compare.{i}", str(path)) for i, path in enumerate(extra)]
    return found


def build_server(cfg: DictConfig, key: str = "ckpt", path: str | None = None, *, name: str | None = None) -> Server:
    engine = Engine(path or cfg.ckpt, key=key, device=str(cfg.device), precision=str(cfg.precision), chat=cfg.chat,
                    trust_remote_code=bool(cfg.trust_remote_code), decode_weights=str(cfg.decode_weights))
    limits = dataclass_from_cfg(Limits, cfg.limits, "limits")
    batching = dataclass_from_cfg(Batching, cfg.batching, "batching")
    return Server(engine, model_name=str(name or engine.name), limits=limits, batching=batching,
                  seed=int(cfg.seed))


def build_servers(cfg: DictConfig) -> list[Server]:
    """One Server (engine + batching worker) per checkpoint; names stay unique (`model_name` names the first)."""
    servers, names = [], set()
    for i, (key, path) in enumerate(served_checkpoints(cfg)):
        server = build_server(cfg, key, path, name=str(cfg.model_name) if i == 0 and cfg.model_name else None)
        base, n = server.model_name, 2
        while server.model_name in names:  # two step folders of one run, or the same folder twice
            server.model_name, n = f"{base}#{n}", n + 1
        names.add(server.model_name)
        servers.append(server)
    return servers


def check_auth(host: str, token: str | None) -> str | None:
    if token is not None and len(str(token)) < 8:
        raise UserError("auth_token: use at least 8 characters (or leave it null on a loopback host)")
    if host not in LOOPBACK and token is None:
        raise UserError(f"auth_token: serving on {host} (not loopback) needs a token; set auth_token=... "
                        f"or PALMRL_SERVE_TOKEN, or bind host=127.0.0.1")
    return None if token is None else str(token)


def run(cfg: DictConfig) -> Path | None:
    import uvicorn

    seed_everything(int(cfg.seed))
    host, port = str(cfg.host), int(cfg.port)
    if not 0 < port < 65536:
        raise UserError(f"port must be in 1..65535, got {port}")
    token = check_auth(host, cfg.get("auth_token"))
    check_port_free(host, port)
    prompts = load_prompts(cfg.prompts) if cfg.get("prompts") else None
    if prompts is not None and not cfg.get("feedback_dir"):
        raise UserError("prompts: a labelling queue needs feedback_dir=<folder> to write the labels to")
    feedback_dir = Path(str(cfg.feedback_dir)) if cfg.get("feedback_dir") else None
    if feedback_dir is not None:  # before the models load
        check_feedback_dir(feedback_dir)
    servers = build_servers(cfg)
    feedback = queue = None
    if feedback_dir is not None:
        feedback = Feedback(feedback_dir, [s.model_name for s in servers], num_bins=int(cfg.get("num_bins") or 5),
                            seed=int(cfg.seed))
        queue = PromptQueue(prompts, feedback.paths["judgements"]) if prompts is not None else None
    for server in servers:
        engine = server.engine
        console.print(f"palmrl serve: {server.model_name} ({engine.checkpoint.stage} checkpoint, "
                      f"{engine.model.num_params():,} parameters, context {engine.max_seq_len}, "
                      f"{'chat template' if engine.chat else 'raw text'})")
    shown = f"[{host}]" if ":" in host else host
    console.print(f"  web page http://{shown}:{port}/ · OpenAI API http://{shown}:{port}/v1"
                  + (f" · labels to {feedback.folder}" if feedback else "")
                  + (" · token required" if token else ""))
    # on a loopback address, answer only to loopback names (and allowed_hosts): DNS rebinding defence
    allowed = frozenset([*LOOPBACK, host, *[str(h) for h in (cfg.get("allowed_hosts") or [])]]) \
        if host in LOOPBACK else None
    uvicorn.run(build_app(servers, allowed_hosts=allowed, auth_token=token, feedback=feedback, queue=queue),
                host=host, port=port, log_level=str(cfg.log_level), access_log=False)
    return None
