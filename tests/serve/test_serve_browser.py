"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright for Python):
type a question, watch the answer stream in under a reasoning block, follow up, stop a generation.

The server is the real app on uvicorn, in a thread; the tiny model's tokens follow the scripts of
serve_utils, slowed down so that streaming is visible. `MEDCOT_UPDATE_SCREENSHOT=1` also writes
docs/serve_screenshot.png.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from serve_utils import REPO, SCRIPTS, ScriptedEngine, serve_in_thread, tiny_config

import medcot.serve.app as app_module
from medcot.serve import create_app

CHROMIUM = os.environ.get("MEDCOT_CHROMIUM", "/usr/bin/chromium")
# As root in a container: no sandbox; and no background connections (this machine has no network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _app(tiny_model_dir, mp, api_key=None):
    if api_key:
        mp.setenv("MEDCOT_API_KEY", api_key)
    else:
        mp.delenv("MEDCOT_API_KEY", raising=False)
    mp.setattr(app_module, "Engine", type("Slow", (ScriptedEngine,), {"step_delay_s": 0.03}))
    return create_app(tiny_config(tiny_model_dir))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (scripts/setup.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page


@pytest.fixture(scope="module")
def page_url(tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        app = _app(tiny_model_dir, mp)
        with serve_in_thread(app) as url:
            yield url, app


@pytest.fixture(scope="module")
def page(browser, page_url):
    page = _open(browser, page_url[0])
    yield page
    assert not page.errors, f"JavaScript errors on the page: {page.errors}"


# Records every length the last answer and reasoning had: more than a few distinct lengths = streamed.
WATCH = """() => {
  window.__seen = {answer: new Set(), reasoning: new Set()};
  new MutationObserver(() => {
    const last = [...document.querySelectorAll('.msg.assistant')].pop();
    if (!last) return;
    window.__seen.answer.add(last.querySelector('.answer').textContent.length);
    window.__seen.reasoning.add(last.querySelector('.reasoning-text').textContent.length);
  }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
}"""


def _ask(page, question: str) -> None:
    page.evaluate(WATCH)
    page.fill("#question", question)
    page.press("#question", "Enter")


def _wait_done(page) -> None:
    page.wait_for_function("() => document.querySelector('#send').disabled === false "
                           "&& document.querySelectorAll('.msg.assistant .meta span').length > 0", timeout=60_000)


def test_ask_see_streamed_reasoning_and_answer(page):
    notice = page.locator("#notice")
    assert notice.is_visible() and "not medical advice" in notice.inner_text()
    assert page.locator("#model-name").inner_text() == "model: medcot"

    _ask(page, "What causes croup in children?")
    reasoning, answer = (part.strip() for part in SCRIPTS["croup"].split("</think>"))
    last = page.locator(".msg.assistant").last
    last.locator(".reasoning-text").filter(has_text="larynx").wait_for(timeout=60_000)
    assert page.locator("#stop").is_visible()  # still generating
    _wait_done(page)
    assert last.locator(".answer").inner_text() == answer
    seen = page.evaluate("() => ({a: window.__seen.answer.size, r: window.__seen.reasoning.size})")
    assert seen["a"] > 3 and seen["r"] > 3, f"text arrived in too few pieces to be a stream: {seen}"

    # The reasoning block folds away once the answer is in, and opens on a click.
    details = last.locator("details.reasoning")
    assert details.is_visible() and details.get_attribute("open") is None
    assert "Reasoning (" in details.locator("summary").inner_text()
    details.locator("summary").click()
    assert details.locator(".reasoning-text").inner_text() == reasoning
    assert notice.is_visible()


def test_follow_up_keeps_the_conversation(page, tmp_path):
    _ask(page, "And anaphylaxis: what is the first treatment?")
    _wait_done(page)
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    last = page.locator(".msg.assistant").last
    assert last.locator(".answer").inner_text() == SCRIPTS["anaphylaxis"].split("</think>")[1].strip()
    last.locator("details.reasoning summary").click()  # show the second reasoning open in the screenshot
    page.evaluate("() => window.scrollTo(0, 0)")
    shot = tmp_path / "serve_screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MEDCOT_UPDATE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "serve_screenshot.png")


def test_stop_button_ends_the_generation(page, page_url):
    engine = page_url[1].state.life.served.engine
    before = engine.stats.cancelled
    _ask(page, "unfinished thoughts on a long case")
    last = page.locator(".msg.assistant").last
    last.locator(".reasoning-text").filter(has_text="history").wait_for(timeout=60_000)
    page.click("#stop")
    last.locator(".meta").filter(has_text="Stopped").wait_for(timeout=10_000)
    deadline = time.monotonic() + 10
    while engine.stats.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats.cancelled == before + 1  # the server stopped generating, not just the page
    assert engine.load()["running"] == 0


def test_follow_ups_send_earlier_answers_with_content(page):
    """Every earlier assistant turn goes back with text: the answer, or the reasoning so far for the stopped
    one (it used to go back as content "", so the model lost that part of the conversation)."""
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    _ask(page, "And what causes croup in adults?")
    _wait_done(page)
    messages = sent[-1]["messages"]
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(assistant) == 3 and all(text.strip() for text in assistant), assistant
    assert assistant[0] == SCRIPTS["croup"].split("</think>")[1].strip()
    assert SCRIPTS["unfinished"].startswith(assistant[2])  # the stopped turn: its reasoning so far
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]


def test_max_tokens_above_the_limit_says_so(page, page_url):
    """With Settings folded, Send used to do nothing (the browser's bubble has nowhere to show); now the page
    opens Settings on the field and says what the limit is, and sends nothing until it is fixed."""
    limit = page_url[1].state.life.served.cfg.serve.max_tokens_limit
    page.evaluate("() => { document.querySelector('.settings').open = false; }")
    page.evaluate(f"() => {{ document.querySelector('#max-tokens').value = '{limit + 1}'; }}")
    answers = page.locator(".msg.assistant").count()
    page.fill("#question", "What causes croup?")
    page.press("#question", "Enter")
    status = page.locator("#status")
    status.filter(has_text=str(limit)).wait_for(timeout=5_000)
    assert "Max tokens" in status.inner_text() and page.locator("#max-tokens").is_visible()
    assert page.locator(".msg.assistant").count() == answers and page.input_value("#question") == "What causes croup?"
    page.fill("#max-tokens", "40")
    page.press("#question", "Enter")
    _wait_done(page)
    assert page.locator(".msg.assistant").count() == answers + 1


def test_page_asks_for_the_api_key(browser, tiny_model_dir):
    """A missing key and a wrong key get different messages; the right one is then used."""
    with pytest.MonkeyPatch.context() as mp, serve_in_thread(_app(tiny_model_dir, mp, api_key="sk-page-key")) as url:
        page = _open(browser, url)
        page.wait_for_function("() => document.querySelector('#model-name').textContent !== ''")
        assert page.locator("#key-row").count() == 1
        _ask(page, "What causes croup?")
        missing = page.locator(".msg.assistant .meta .error").last
        missing.filter(has_text="needs an API key").wait_for(timeout=30_000)
        assert page.locator("#api-key").is_visible()  # settings opened on the key field
        page.fill("#api-key", "sk-wrong-key")
        _ask(page, "What causes croup?")
        wrong = page.locator(".msg.assistant").nth(1).locator(".meta .error")
        wrong.filter(has_text="not accepted").wait_for(timeout=30_000)
        assert "needs an API key" not in wrong.inner_text()
        page.fill("#api-key", "sk-page-key")
        _ask(page, "What causes croup?")
        page.locator(".msg.assistant").last.locator(".answer").filter(has_text="parainfluenza").wait_for(timeout=60_000)
        page.close()
