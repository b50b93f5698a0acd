"""The labelling side of `palmrl serve`: blind comparisons, the label files the reward and DPO stages
read, concurrent clicks, the token, the statistics, the prompt queue (HTTP, no browser; the page
in a real browser is tests/test_feedback_browser.py)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import running, tiny_checkpoint

from palmrl.errors import UserError
from palmrl.serving.app import Limits, Server, build_app
from palmrl.serving.feedback import Feedback, Model, PromptQueue, SideDeck, judgement_stats, load_prompts, wilson
from palmrl.serving.generator import Engine
from palmrl.serving.scheduler import Batching
from palmrl.serving.schemas import HTTPFailure
from palmrl.stages.serve import check_auth

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAGE = Path(__file__).parents[1] / "palmrl" / "serving" / "page"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two different random checkpoints: what is compared."""
    root = tmp_path_factory.mktemp("feedback-ckpts")
    return [Engine(tiny_checkpoint(root / name, seed=seed)) for seed, name in enumerate(("first", "second"))]


def servers_of(engines, **limits):
    return [Server(e, model_name=name, limits=Limits(max_tokens=32, **limits), batching=Batching(window_ms=2))
            for e, name in zip(engines, ("run/first", "run/second"))]


def model(name: str) -> Model:
    return Model(name, f"/runs/{name}/final", "ab" * 32, "sft", 10)


# ---------------------------------------------------------------------------------------------
# the log and its formats


@pytest.mark.unit
def test_a_judgement_writes_what_reward_and_dpo_read_with_provenance(tmp_path):
    from palmrl.data.preferences import load_preference_pairs

    fb = Feedback(tmp_path / "labels", ["a", "b"], seed=0)
    assert not (tmp_path / "labels").exists()  # made at the first label, not at startup
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "seeds": {"A": 3, "B": 4}}
    first = fb.open("What is 2+2?", {"A": "4", "B": "five"}, {"A": model("a"), "B": model("b")}, sampling, "ann-1")
    record = fb.judge(first.id, "A", {"A": 5, "B": 1}, "ann-1")
    assert record["models"]["A"]["sha256"] == "ab" * 32 and record["sampling"] == sampling
    second = fb.open("Name a colour", {"A": "blue", "B": "sky"}, {"A": model("b"), "B": model("a")}, sampling, "ann-2")
    fb.judge(second.id, "tie", {}, "ann-2")
    third = fb.open("Opposite of up?", {"A": "up", "B": "down"}, {"A": model("a"), "B": model("b")}, sampling, "ann-2")
    fb.judge(third.id, "B", {}, "ann-2")

    lines = [json.loads(line) for line in (tmp_path / "labels" / "judgements.jsonl").read_text().splitlines()]
    assert [r["choice"] for r in lines] == ["A", "tie", "B"]
    prefs = [json.loads(line) for line in (tmp_path / "labels" / "prefs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [("4", "five"), ("down", "up")]  # a tie is no pair
    assert prefs[0]["provenance"]["chosen"]["name"] == "a" and prefs[0]["provenance"]["annotator"] == "ann-1"
    ratings = [json.loads(line) for line in (tmp_path / "labels" / "ratings.jsonl").read_text().splitlines()]
    assert [(r["response"], r["rating"]) for r in ratings] == [("4", 5), ("five", 1)]

    # the stages' own loader reads the file as it is
    pairs, _ = load_preference_pairs({"source": "local", "path": str(tmp_path / "labels" / "prefs.jsonl"),
                                      "val_fraction": 0.0}, "train")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("What is 2+2?", "4", "five"),
                                                                 ("Opposite of up?", "down", "up")]

    with pytest.raises(HTTPFailure, match="already judged"):
        fb.judge(first.id, "B", {}, "ann-1")
    fourth = fb.open("p", {"A": "x", "B": "y"}, {"A": model("a"), "B": model("b")}, sampling, "ann-1")
    with pytest.raises(HTTPFailure, match=r"ratings\.B must be an integer in 1\.\.5"):
        fb.judge(fourth.id, None, {"B": 6}, "ann-1")
    with pytest.raises(HTTPFailure, match="needs a choice"):
        fb.judge(fourth.id, None, {}, "ann-1")
    assert len((tmp_path / "labels" / "judgements.jsonl").read_text().splitlines()) == 3  # refusals wrote nothing


@pytest.mark.unit
def test_sides_are_shuffled_but_balanced():
    import random

    deck = SideDeck(random.Random(1))
    draws = [deck.sides("a", "b") for _ in range(40)]
    for i in range(0, 40, 2):  # every two comparisons of a pair show each order once
        assert sorted(draws[i:i + 2]) == [("a", "b"), ("b", "a")]
    assert len({tuple(draws[i:i + 2]) for i in range(0, 40, 2)}) == 2  # and which comes first varies


@pytest.mark.unit
def test_stats_win_rates_intervals_and_agreement():
    def judged(prompt, a, b, choice, who):
        return {"prompt": prompt, "models": {"A": {"name": a}, "B": {"name": b}}, "choice": choice, "annotator": who}

    records = [judged("p1", "sft", "ppo", "B", "x"), judged("p1", "ppo", "sft", "A", "y"),  # agree: ppo
               judged("p2", "sft", "ppo", "A", "x"), judged("p2", "sft", "ppo", "B", "y"),  # disagree
               judged("p3", "ppo", "sft", "tie", "x"), judged("p4", "ppo", "sft", "A", "x")]
    stats = judgement_stats(records)
    by = {m["name"]: m for m in stats["models"]}
    assert (by["ppo"]["wins"], by["ppo"]["losses"], by["ppo"]["ties"]) == (4, 1, 1)
    assert by["ppo"]["win_rate"] == pytest.approx(0.8)
    assert by["ppo"]["ci_low"] < 0.8 < by["ppo"]["ci_high"]
    assert stats["agreement"] == {"pairs": 2, "agreed": 1, "rate": 0.5}
    assert stats["judgements"] == 6 and stats["annotators"] == 2
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


@pytest.mark.unit
def test_prompt_queue_serves_each_annotator_in_turn_and_resumes(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    judgements = tmp_path / "judgements.jsonl"
    judgements.write_text(json.dumps({"prompt": "q0", "annotator": "x"}) + "\n")
    queue = PromptQueue(load_prompts(path), judgements)
    assert queue.next("x")["prompt"] == "q1"  # q0 was judged before a restart
    assert queue.next("y")["prompt"] == "q0"
    assert queue.next("x")["prompt"] == "q2"
    assert queue.next("x") == {"done": True, "total": 3}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 1}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected an object with a \"prompt\" string"):
        load_prompts(bad)


# ---------------------------------------------------------------------------------------------
# over HTTP


@pytest.mark.unit
def test_fifty_concurrent_label_submissions_make_fifty_lines(engines, tmp_path):
    fb = Feedback(tmp_path / "fb", ["run/first", "run/second"], seed=0)
    app = build_app(servers_of(engines, max_concurrent=64), feedback=fb)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        ids = []
        for i in range(50):
            r = c.post("/ui/compare", json={"prompt": f"prompt {i}", "annotator": "load", "max_tokens": 2,
                                            "temperature": 0.8})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])

        def click(i_id):
            i, pair = i_id
            return httpx.post(f"{url}/ui/judge", timeout=60, json={
                "id": pair, "annotator": f"ann-{i % 5}", "choice": ("A", "B", "tie", "both_bad")[i % 4],
                "ratings": {"A": 1 + i % 5}})

        with ThreadPoolExecutor(max_workers=25) as pool:  # bounded: 25 clients at a time, 50 clicks
            codes = [r.status_code for r in pool.map(click, enumerate(ids))]
        assert codes == [200] * 50
        lines = (tmp_path / "fb" / "judgements.jsonl").read_text().splitlines()
        assert len(lines) == 50 and sorted(json.loads(line)["id"] for line in lines) == sorted(ids)
        assert len((tmp_path / "fb" / "prefs.jsonl").read_text().splitlines()) == 26  # A or B: i % 4 in (0, 1)
        assert len((tmp_path / "fb" / "ratings.jsonl").read_text().splitlines()) == 50
        stats = c.get("/ui/stats").json()
        assert stats["judgements"] == 50 and stats["annotators"] == 5
        assert sum(m["comparisons"] for m in stats["models"]) == 100


@pytest.mark.unit
def test_the_api_serves_every_compared_model_by_name(engines):
    from fastapi.testclient import TestClient

    with TestClient(build_app(servers_of(engines))) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["run/first", "run/second"]
        for name in ("run/first", "run/second", None):
            body = {"prompt": "hi", "max_tokens": 2, **({"model": name} if name else {})}
            assert c.post("/v1/completions", json=body).status_code == 200
        missing = c.post("/v1/completions", json={"prompt": "hi", "model": "run/third"})
        assert missing.status_code == 404 and "'run/first', 'run/second'" in missing.json()["error"]["message"]
        off = c.post("/ui/compare", json={"prompt": "hi", "annotator": "a"})  # no feedback_dir
        assert off.status_code == 400 and off.json()["error"]["param"] == "feedback_dir"
        bad = c.post("/ui/judge", json={"id": "x", "annotator": "a", "choice": "C"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "choice"


@pytest.mark.unit
def test_the_token_guards_every_route_and_the_login_form_sets_a_cookie(engines, tmp_path):
    from fastapi.testclient import TestClient

    token = "s3cret-token"
    fb = Feedback(tmp_path / "fb", ["run/first", "run/second"])
    with TestClient(build_app(servers_of(engines), auth_token=token, feedback=fb)) as c:
        for method, path in [("get", "/v1/models"), ("get", "/ui/stats"), ("get", "/page/app.js"), ("get", "/health"),
                             ("post", "/ui/compare"), ("post", "/v1/chat/completions")]:
            denied = getattr(c, method)(path)
            assert denied.status_code == 401, path
            assert denied.json()["error"]["type"] == "authentication_error"
            assert denied.headers["www-authenticate"] == "Bearer"
        page = c.get("/", headers={"accept": "text/html"})
        assert page.status_code == 401 and '<form method=post action=/login>' in page.text
        assert c.get("/v1/models", headers={"authorization": "Bearer wrong-token"}).status_code == 401
        assert c.get("/v1/models", headers={"authorization": f"Bearer {token}"}).status_code == 200

        wrong = c.post("/login", data={"token": "nope"}, follow_redirects=False)
        assert wrong.status_code == 401 and "wrong token" in wrong.text
        ok = c.post("/login", data={"token": token}, follow_redirects=False)
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and token not in cookie
        assert c.get("/", headers={"accept": "text/html"}).status_code == 200  # the client keeps the cookie
        assert c.get("/ui/stats").status_code == 200


@pytest.mark.unit
def test_a_server_off_loopback_needs_a_token():
    assert check_auth("127.0.0.1", None) is None
    with pytest.raises(UserError, match="auth_token: serving on 0.0.0.0 .* needs a token"):
        check_auth("0.0.0.0", None)
    with pytest.raises(UserError, match="at least 8 characters"):
        check_auth("0.0.0.0", "short")
    assert check_auth("0.0.0.0", "long-enough") == "long-enough"


@pytest.mark.unit
def test_the_page_is_offline_and_never_builds_markup_from_text(engines):
    from fastapi.testclient import TestClient

    script = (PAGE / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)
    html = (PAGE / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "the page must not load anything from elsewhere"
    with TestClient(build_app(servers_of(engines))) as c:
        page = c.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert c.get("/page/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/page/../app.py").status_code == 404
