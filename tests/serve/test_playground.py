"""The playground in a real headless browser: Debian's chromium driven by Selenium through the
system chromedriver (nothing downloaded). It loads the page, types a prompt, watches tokens
stream in, hovers a token for its alternatives, opens the tokenizer and attention panels, chats,
and saves screenshots at laptop and phone widths under the test's temp dir."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not CHROMIUM or not Path(CHROMEDRIVER).is_file():
    pytest.skip(
        "no system chromium/chromedriver (Debian: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser(monkeypatch_module):
    from selenium.webdriver.chrome.service import Service

    monkeypatch_module.setenv("SE_OFFLINE", "true")  # never let selenium-manager download
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--force-prefers-reduced-motion",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def wait_for(predicate, timeout: float = 20.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except StaleElementReferenceException:  # the page re-rendered under us: look again
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


@pytest.fixture
def page(browser, live):
    browser.get(live.url + "/")
    key = live.headers["Authorization"].split()[1]
    browser.execute_script("localStorage.setItem('gpt2lab-key', arguments[0]);", key)
    browser.get(live.url + "/")
    wait_for(lambda: "layers" in browser.find_element("id", "model-info").text)
    return browser


@pytest.fixture
def slow_engine(live):
    """~40 ms per decode step, so that a stream is slow enough to watch arrive."""
    engine = live.state.engine
    step = engine.cache.step

    def slow(tokens):
        time.sleep(0.04)
        return step(tokens)

    engine.cache.step = slow
    yield
    engine.cache.step = step


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));",
        element_id,
        str(value),
    )


def count_tokens(driver) -> int:
    return len(driver.find_elements("css selector", "#output .tok"))


def test_prompt_streams_tokens_with_alternatives_and_attention(page, live, slow_engine, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    d = page
    assert d.find_element("id", "chat-view").is_displayed()  # a chat model starts in chat
    d.find_element("id", "mode-complete").click()
    prompt = d.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("Once upon a time")
    set_value(d, "temperature", 0)
    set_value(d, "max-tokens", 30)
    d.find_element("id", "generate").click()
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen.append(count_tokens(d))
        if not d.find_element("id", "stop").is_enabled() and seen[-1]:
            break
        time.sleep(0.02)
    final = count_tokens(d)
    assert final > 5
    assert any(0 < n < final for n in seen), seen  # tokens arrived while the stream ran
    status = d.find_element("id", "status").text
    assert "tokens in" in status, status
    d.save_screenshot(str(tmp_path / "laptop-output.png"))

    # the same text as the API gives for the same request
    r = live.client().completions.create(
        model="x", prompt="Once upon a time", max_tokens=30, temperature=0
    )
    shown = d.find_element("id", "output").text
    assert shown.replace("\n", "").startswith("Once upon a time")
    tokens = d.find_elements("css selector", "#output .tok")
    first_text = r.choices[0].text
    assert "".join(t.get_attribute("data-token") for t in tokens).startswith(first_text[:10])

    # hovering a token shows its top-5 alternatives, the chosen one marked
    ActionChains(d).move_to_element(tokens[2]).perform()
    tip = d.find_element("id", "tooltip")
    wait_for(lambda: tip.is_displayed())
    rows = tip.find_elements("css selector", "tr")
    assert len(rows) == 5
    assert len(tip.find_elements("css selector", "tr.chosen")) == 1  # greedy: the top one
    d.save_screenshot(str(tmp_path / "laptop-hover.png"))

    # the tokenizer view: pieces and ids of the whole text
    d.find_element("css selector", "#tokenizer-panel summary").click()
    pieces = wait_for(lambda: d.find_elements("css selector", "#pieces .piece"))
    assert len(pieces) >= final
    assert pieces[0].find_element("tag name", "small").text.isdigit()

    # look inside: the attention map of a chosen layer and head
    d.find_element("id", "inside-summary").click()
    wait_for(lambda: "Layer 0, head 0" in d.find_element("id", "inside-note").text)
    d.execute_script(
        "const s = document.getElementById('layer'); s.value = '1';"
        "s.dispatchEvent(new Event('change'));"
    )
    wait_for(lambda: "Layer 1, head 0" in d.find_element("id", "inside-note").text)
    canvas = d.find_element("id", "attention")
    assert canvas.size["width"] > 100 and canvas.size["height"] > 100
    d.execute_script("arguments[0].scrollIntoView();", canvas)
    d.save_screenshot(str(tmp_path / "laptop-attention.png"))
    for name in ("laptop-output", "laptop-hover", "laptop-attention"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_stop_frees_the_slot(page, live, slow_engine):
    d = page
    d.find_element("id", "mode-complete").click()
    d.find_element("id", "prompt").send_keys("Hello")
    set_value(d, "max-tokens", 48)
    d.find_element("id", "generate").click()
    wait_for(lambda: count_tokens(d) >= 2)
    d.find_element("id", "stop").click()
    wait_for(lambda: "stopped" in d.find_element("id", "status").text)
    h = live.wait_idle(timeout=3)
    assert h["busy_slots"] == 0 and h["running"] == 0
    assert count_tokens(d) < 40


def test_chat_on_a_phone(page, live, tmp_path):
    d = page
    d.set_window_size(390, 844)
    try:
        box = d.find_element("id", "chat-input")
        box.send_keys("Name a colour.")
        set_value(d, "temperature", 0)
        set_value(d, "max-tokens", 12)
        d.find_element("id", "generate").click()
        wait_for(lambda: d.find_elements("css selector", "#chat-log .msg.assistant"))
        # read in one script: the log re-renders while the reply streams (an element found
        # first and read later can be stale by then)
        user = d.execute_script(
            "const m = document.querySelector('#chat-log .msg.user'); return m && m.innerText;"
        )
        assert user.strip() == "Name a colour."
        # legible: nothing wider than the screen, no horizontal scrolling
        overflow = d.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth;"
        )
        assert overflow <= 1, overflow
        font = d.execute_script(
            "return parseFloat(getComputedStyle(document.getElementById('chat-input')).fontSize);"
        )
        assert font >= 14
        d.save_screenshot(str(tmp_path / "phone-chat.png"))
        d.find_element("id", "mode-complete").click()
        d.save_screenshot(str(tmp_path / "phone-complete.png"))
        assert (tmp_path / "phone-chat.png").stat().st_size > 5000
    finally:
        d.set_window_size(1280, 900)
