"""`palmrl serve ckpt=…`: an OpenAI-compatible HTTP server over a checkpoint (FastAPI + uvicorn).

Builds the engine, the batching server and the app (palmrl/serving/app.py), checks the
port is free, then hands over to uvicorn until Ctrl-C.
"""

from __future__ import annotations

import socket
from pathlib import Path

from omegaconf import DictConfig

from palmrl.errors import UserError
from palmrl.runtime import seed_everything
from palmrl.selfinstruct.filters import dataclass_from_cfg
from palmrl.serving.app import Limits, Server, build_app
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


def build_server(cfg: DictConfig) -> Server:
    engine = Engine(cfg.ckpt, key="ckpt", device=str(cfg.device), precision=str(cfg.precision), chat=cfg.chat,
                    trust_remote_code=bool(cfg.trust_remote_code))
    limits = dataclass_from_cfg(Limits, cfg.limits, "limits")
    batching = dataclass_from_cfg(Batching, cfg.batching, "batching")
    return Server(engine, model_name=str(cfg.model_name or engine.name), limits=limits, batching=batching,
                  seed=int(cfg.seed))


def run(cfg: DictConfig) -> Path | None:
    import uvicorn

    seed_everything(int(cfg.seed))
    host, port = str(cfg.host), int(cfg.port)
    if not 0 < port < 65536:
        raise UserError(f"port must be in 1..65535, got {port}")
    check_port_free(host, port)
    server = build_server(cfg)
    engine = server.engine
    console.print(f"palmrl serve: {server.model_name} ({engine.checkpoint.stage} checkpoint, "
                  f"{engine.model.num_params():,} parameters, context {engine.max_seq_len}, "
                  f"{'chat template' if engine.chat else 'raw text'}) on http://{host}:{port}/v1")
    if host not in LOOPBACK:
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach it can use it (no auth)")
    # on a loopback address, answer only to loopback names (and allowed_hosts): DNS rebinding defence
    allowed = frozenset([*LOOPBACK, host, *[str(h) for h in (cfg.get("allowed_hosts") or [])]]) \
        if host in LOOPBACK else None
    uvicorn.run(build_app(server, allowed_hosts=allowed), host=host, port=port, log_level=str(cfg.log_level),
                access_log=False)
    return None
