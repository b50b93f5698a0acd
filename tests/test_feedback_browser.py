"""`palmrl serve`'s page in a real browser (headless Chromium through Selenium): chat with streamed
tokens, a blind comparison judged by a click and the line it writes, model output that is HTML
shown as text, and the loop closed: labels made on the page train `palmrl reward` and `palmrl dpo`.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the tests
are skipped, unless PALMRL_REQUIRE_BROWSER=1 (set by .ci/run), which makes a missing browser a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from test_serve import ScriptedModel, running, tiny_checkpoint

from palmrl.serving.app import Limits, Server, build_app
from palmrl.serving.feedback import Feedback, PromptQueue
from palmrl.serving.generator import Engine
from palmrl.serving.scheduler import Batching

from conftest import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCREENSHOT = os.environ.get("PALMRL_SCREENSHOT")  # also save the compare view here (docs/img/serve_compare.png)

# what the two scripted "models" answer: markup that would run if the page ever rendered it as HTML
ALPHA = '<img src=x onerror="window.pwned=1">alpha says <b>hi</b>'
BETA = "<script>window.pwned=2</script>beta answers"


def find_browser() -> tuple[str, str] | None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


@pytest.fixture(scope="module")
def browser():
    found = find_browser()
    if found is None:
        if os.environ.get("PALMRL_REQUIRE_BROWSER") == "1":
            pytest.fail("PALMRL_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed "
                        "(apt-get install -y chromium chromium-driver)")
        pytest.skip("no chromium + chromedriver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(arg)
    options.binary_location = found[0]
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class EveryRow(ScriptedModel):
    """ScriptedModel's one script, for however many rows a batch has."""

    def forward(self, tokens, attention_mask=None, cache=None, last_only=False):
        self.script = self.script[:1] * tokens.shape[0]
        return super().forward(tokens, attention_mask, cache, last_only)


def scripted_engine(folder: Path, seed: int, text: str) -> Engine:
    """A real engine (tokenizer, lineage, streaming) whose greedy choice spells `text`, then ends."""
    engine = Engine(tiny_checkpoint(folder, seed=seed))
    ids = [7 + b for b in text.encode()] + [engine.tokenizer.eos_id]  # the byte tokenizer: byte b is id 7 + b
    engine.model = EveryRow([ids], engine.tokenizer.vocab_size, engine.max_seq_len)
    return engine


def serve_app(servers, feedback, queue=None):
    return build_app(servers, feedback=feedback, queue=queue)


def labels(folder: Path, name: str) -> list[dict]:
    path = folder / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def open_page(driver, url: str):
    driver.get(url + "/")
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="the page to start")


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def set_value(driver, element_id: str, value: str) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(value)


@pytest.mark.integration
def test_chat_streams_compare_is_blind_and_a_click_writes_the_label(browser, tmp_path):
    engines = [scripted_engine(tmp_path / "alpha", 0, ALPHA), scripted_engine(tmp_path / "beta", 1, BETA)]
    servers = [Server(e, model_name=name, limits=Limits(max_tokens=96), batching=Batching(window_ms=2))
               for e, name in zip(engines, ("run/alpha", "run/beta"))]
    prompts = ["Which is better?", "Say something", "Third prompt", "Fourth prompt"]
    fb = Feedback(tmp_path / "feedback", [s.model_name for s in servers], seed=0)
    queue = PromptQueue(prompts, fb.paths["judgements"])
    with running(serve_app(servers, fb, queue)) as url:
        open_page(browser, url)
        set_value(browser, "temperature", "0")  # the scripted models are read greedily
        set_value(browser, "max-tokens", "96")

        # chat: the reply arrives in pieces, and markup in it stays text
        set_value(browser, "chat-input", "hello")
        by_id(browser, "send").click()
        reply = wait_for(lambda: browser.execute_script(
            "const li = document.querySelector('#messages li.assistant:last-child');"
            "return li && li.dataset.done === '1' ? li : null;"), what="the streamed reply")
        assert reply.find_element("css selector", ".text").text == ALPHA, by_id(browser, "chat-status").text
        assert int(reply.get_attribute("data-chunks")) >= 10  # streamed token by token, not in one piece
        assert browser.find_elements("css selector", "#messages img, #messages b") == []
        assert browser.execute_script("return window.pwned") is None
        assert "error" not in by_id(browser, "chat-status").get_attribute("class")

        # compare: the queue fills the prompt; the answers come back on shuffled sides, names hidden
        browser.find_element("id", "tab-compare").click()
        sides = []
        for i, prompt in enumerate(prompts):
            wait_for(lambda prompt=prompt: by_id(browser, "compare-prompt").get_attribute("value") == prompt,
                     what=f"queue prompt {i + 1}")
            by_id(browser, "compare-go").click()
            wait_for(lambda: by_id(browser, "pick-A").is_enabled(), what="both answers")
            shown = {side: by_id(browser, f"answer-{side}").text for side in "AB"}
            assert sorted(shown.values()) == sorted([ALPHA, BETA])
            hidden = by_id(browser, "view-compare").text
            assert "run/alpha" not in hidden and "run/beta" not in hidden
            if i == 0:
                from selenium.webdriver.support.ui import Select

                Select(by_id(browser, "rate-A")).select_by_value("4")
            by_id(browser, "pick-A").click()
            wait_for(lambda n=str(i + 1): by_id(browser, "compare-status").get_attribute("data-saved") == n,
                     what=f"judgement {i + 1} saved")
            status = by_id(browser, "compare-status").text
            record = labels(fb.folder, "judgements.jsonl")[-1]
            assert record["answers"] == shown and record["choice"] == "A" and record["prompt"] == prompt
            assert f"A was {record['models']['A']['name']}" in status  # revealed only after the click
            sides.append(record["models"]["A"]["name"])
        assert sorted(sides) == ["run/alpha", "run/alpha", "run/beta", "run/beta"]  # shuffled and balanced
        assert browser.execute_script("return window.pwned") is None
        wait_for(lambda: "queue finished" in by_id(browser, "queue-status").text, what="the end of the queue")

        first = labels(fb.folder, "judgements.jsonl")[0]
        assert first["ratings"] == {"A": 4} and first["sampling"]["temperature"] == 0.0
        assert first["sampling"]["max_tokens"] == 96 and first["annotator"].startswith("anon-")
        for side, engine in zip("AB", (engines if first["models"]["A"]["name"] == "run/alpha" else engines[::-1])):
            lineage = engine.lineage()
            assert first["models"][side]["path"] == lineage["path"]
            assert first["models"][side]["sha256"] == lineage["sha256"]
        prefs = labels(fb.folder, "prefs.jsonl")
        assert len(prefs) == 4 and prefs[0]["chosen"] == first["answers"]["A"]
        assert labels(fb.folder, "ratings.jsonl")[0]["rating"] == 4

        # stats
        browser.find_element("id", "tab-stats").click()
        wait_for(lambda: "4 judgements" in by_id(browser, "stats-summary").text, what="the stats")
        rows = browser.find_elements("css selector", "#stats-table tbody tr")
        assert [r.find_element("css selector", "td").text for r in rows] == ["run/alpha", "run/beta"]


@pytest.mark.integration
def test_with_a_token_the_browser_logs_in_first(browser, tmp_path):
    engine = scripted_engine(tmp_path / "alpha", 0, "fine, thanks")
    app = build_app([Server(engine, model_name="run/alpha")], auth_token="page-token-123")
    with running(app) as url:
        browser.delete_all_cookies()
        browser.get(url + "/")
        assert browser.find_elements("id", "chat-input") == []  # the login form, not the page
        browser.find_element("name", "token").send_keys("wrong-token")
        browser.find_element("css selector", "form button").click()
        wait_for(lambda: "wrong token" in browser.page_source, what="the refusal")
        browser.find_element("name", "token").send_keys("page-token-123")
        browser.find_element("css selector", "form button").click()
        wait_for(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), what="the page")
        set_value(browser, "temperature", "0")
        set_value(browser, "chat-input", "how are you?")
        by_id(browser, "send").click()
        wait_for(lambda: browser.execute_script(
            "const li = document.querySelector('#messages li.assistant:last-child');"
            "return li && li.dataset.done === '1' && li.querySelector('.text').textContent;") == "fine, thanks",
            what="the reply through the cookie")
        browser.delete_all_cookies()


@pytest.mark.integration
def test_labels_made_on_the_page_train_reward_and_dpo(browser, tiny_chain, tmp_path, dist_env):
    """20 blind comparisons of the tiny chain's SFT and PPO checkpoints, judged by scripted clicks
    (the shorter answer wins), then `palmrl reward` and `palmrl dpo` train on the labels file."""
    servers = [Server(Engine(tiny_chain / stage), model_name=f"tiny/{stage}", limits=Limits(max_tokens=24),
                      batching=Batching(window_ms=2)) for stage in ("sft", "ppo")]
    fb = Feedback(tmp_path / "feedback", [s.model_name for s in servers], seed=0)
    with running(serve_app(servers, fb)) as url:
        open_page(browser, url)
        set_value(browser, "max-tokens", "24")
        browser.find_element("id", "tab-compare").click()
        for i in range(20):
            set_value(browser, "compare-prompt", f"How many letters are in the word {'abcdefghijklmnopqrst'[:i + 2]}?")
            by_id(browser, "compare-go").click()
            wait_for(lambda: by_id(browser, "pick-A").is_enabled(), what=f"comparison {i + 1}")
            a, b = (by_id(browser, f"answer-{side}").text for side in "AB")
            if i == 0 and SCREENSHOT:
                browser.save_screenshot(SCREENSHOT)
            choice = "tie" if a == b else ("A" if len(a) <= len(b) else "B")
            by_id(browser, f"pick-{choice}").click()
            wait_for(lambda n=str(i + 1): by_id(browser, "compare-status").get_attribute("data-saved") == n,
                     what=f"judgement {i + 1}")
    judged = labels(fb.folder, "judgements.jsonl")
    pairs = labels(fb.folder, "prefs.jsonl")
    assert len(judged) == 20 and len(pairs) >= 15
    assert all(len(p["chosen"]) <= len(p["rejected"]) for p in pairs)

    prefs = fb.paths["prefs"]
    reward = run_stage("reward", [f"init_from={tiny_chain / 'sft'}", "data=my_prefs", f"data.path={prefs}",
                                  "data.val_fraction=0.25", "lora=none", "optim.lr=1e-3", "train.max_steps=30",
                                  "train.micro_batch_size=8", "train.eval_every=0", "train.save_every=0",
                                  f"out_dir={tmp_path / 'reward'}"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "reward" / "metrics.jsonl").read_text().splitlines()
              if '"split": "train"' in line]
    assert losses[-1] < losses[0], losses  # it learns the page's labels
    manifest = json.loads((Path(reward) / "manifest.json").read_text())
    assert manifest["config"]["data"]["path"] == str(prefs)

    dpo = run_stage("dpo", [f"policy={tiny_chain / 'sft'}", "data=my_prefs", f"data.path={prefs}",
                            "data.val_fraction=0.25", "train.max_steps=10", "train.micro_batch_size=8",
                            "train.eval_every=0", "train.save_every=0", f"out_dir={tmp_path / 'dpo'}"])
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
            if '"split": "train"' in line]
    assert rows and rows[-1]["step"] == 10
    assert json.loads((Path(dpo) / "manifest.json").read_text())["stage"] == "dpo"
