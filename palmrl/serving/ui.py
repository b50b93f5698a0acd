"""The web page `palmrl serve` shows at `/`: chat with a served checkpoint, compare two of them
blind, label which answer is better, and see the labels' statistics.

    GET  /                      the page (palmrl/serving/page/: plain HTML, CSS and JS, no build step, no CDN)
    GET  /page/<file>           its script and style sheet
    GET  /ui/config             the served checkpoints' names, whether comparing and a prompt queue are on, limits
    POST /ui/compare            {prompt, annotator, max_tokens, temperature, top_p} -> {id, answers: {A, B}}
    POST /ui/judge              {id, annotator, choice: A|B|tie|both_bad, ratings: {A: 1-5, B: 1-5}} -> the record
    GET  /ui/next?annotator=…   the next prompt of the labelling queue (`prompts=`) this annotator has not judged
    GET  /ui/stats              judgements, win rates (Wilson 95%), agreement between annotators
    GET|POST /login             the token form when `auth_token` is set (palmrl/serving/app.py's Guard)

The chat tab talks to the OpenAI API (`/v1/chat/completions`, streamed); the compare tab's answers
come from the same batching workers. The page renders model output with `textContent` only and is
served with a Content-Security-Policy that allows no inline script and no other origin.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from palmrl.serving.feedback import Feedback, Model, PromptQueue, check_annotator
from palmrl.serving.schemas import ChatBody, CompareBody, HTTPFailure, JudgeBody

PAGE_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page_file(name: str) -> str:
    return resources.files("palmrl.serving").joinpath("page", name).read_text(encoding="utf-8")


class Labelling:
    """The page's routes over the served models (a name -> Server mapping, first = the default)."""

    def __init__(self, servers: dict, feedback: Feedback | None, queue: PromptQueue | None):
        self.servers, self.feedback, self.queue = servers, feedback, queue

    def config(self) -> dict:
        first = next(iter(self.servers.values()))
        return {"models": list(self.servers), "compare": self.feedback is not None and len(self.servers) >= 2,
                "labels": self.feedback is not None, "queue": self.queue is not None,
                "num_bins": self.feedback.num_bins if self.feedback else 5,
                "max_tokens": first.limits.max_tokens, "default_max_tokens": first.limits.default_max_tokens}

    def _feedback(self) -> Feedback:
        if self.feedback is None:
            raise HTTPFailure(400, "labelling is off: start the server with feedback_dir=<folder>",
                              param="feedback_dir")
        return self.feedback

    async def compare(self, body: CompareBody) -> dict:
        feedback = self._feedback()
        annotator = check_annotator(body.annotator)
        first, second = feedback.pick_pair()
        seeds = {"A": feedback.new_seed(), "B": feedback.new_seed()}  # each side its own sample
        max_tokens = int(body.max_tokens or next(iter(self.servers.values())).limits.default_max_tokens)
        sampling = {"temperature": float(body.temperature), "top_p": float(body.top_p), "max_tokens": max_tokens,
                    "seeds": seeds}

        def request(side: str) -> ChatBody:
            return ChatBody(messages=[{"role": "user", "content": body.prompt}], max_tokens=max_tokens,
                            temperature=sampling["temperature"], top_p=sampling["top_p"], seed=seeds[side])

        replies = await asyncio.gather(*(self.servers[name].chat(request(side))
                                         for side, name in zip("AB", (first, second))))
        answers = {side: reply["choices"][0]["message"]["content"] for side, reply in zip("AB", replies)}
        models = {side: Model.of(name, self.servers[name].engine.lineage())
                  for side, name in zip("AB", (first, second))}
        pending = feedback.open(body.prompt, answers, models, sampling, annotator)
        return {"id": pending.id, "prompt": body.prompt, "answers": answers}

    def judge(self, body: JudgeBody) -> dict:
        record = self._feedback().judge(body.id, body.choice, dict(body.ratings), check_annotator(body.annotator))
        # the names are revealed only after the verdict is on disk
        return {"saved": True, "id": record["id"], "choice": record["choice"],
                "models": {side: m["name"] for side, m in record["models"].items()}}

    def next_prompt(self, annotator: str) -> dict:
        if self.queue is None:
            raise HTTPFailure(400, "no prompt queue: start the server with prompts=<file>", param="prompts")
        return self.queue.next(check_annotator(annotator))

    def stats(self) -> dict:
        return self._feedback().stats()


def add_routes(app, labelling: Labelling) -> None:
    from fastapi.responses import HTMLResponse, Response

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page_file("index.html"), headers=SECURITY_HEADERS)

    @app.get("/page/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in PAGE_FILES:
            raise HTTPFailure(404, f"no page file {name!r}", code="not_found")
        return Response(page_file(name), media_type=PAGE_FILES[name], headers=SECURITY_HEADERS)

    @app.get("/ui/config")
    async def config():
        return labelling.config()

    @app.post("/ui/compare")
    async def compare(body: CompareBody):
        return await labelling.compare(body)

    @app.post("/ui/judge")
    async def judge(body: JudgeBody):
        # the append + fsync runs off the event loop: other requests keep streaming meanwhile
        return await asyncio.to_thread(labelling.judge, body)

    @app.get("/ui/next")
    async def next_prompt(annotator: str = ""):
        return await asyncio.to_thread(labelling.next_prompt, annotator)

    @app.get("/ui/stats")
    async def stats():
        return await asyncio.to_thread(labelling.stats)
