"""The playground page in a real browser (Debian's headless Chromium through its driver) against
the session's server: what it shows must be what the server answers.

`make test` installs chromium and chromium-driver (`make browser`); without them these skip.
The first test leaves a screenshot of the page in use at docs/playground.png.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="needs Debian's chromium and chromium-driver (make browser)")

# The page's entropy buckets (nats), restated here: upper edges, the last bucket open.
ENTROPY_EDGES = [0.5, 1, 2, 3, 4]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
STREAM_TIMEOUT_S = 300


def expected_bucket(entropy: float) -> str:
    return str(sum(entropy >= edge for edge in ENTROPY_EDGES))


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--hide-scrollbars"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_window_size(1280, 800)
    yield driver
    driver.quit()


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def open_page(driver, server):
    """Load the page; when it asks for the key (this tab has none yet), a wrong key first."""
    driver.get(f"{server.base_url}/")
    wait(driver, lambda d: by_id(d, "key-form").is_displayed()
         or by_id(d, "model-name").text != "connecting…")
    if by_id(driver, "key-form").is_displayed():
        by_id(driver, "api-key").send_keys("not-the-key")
        css(driver, "#key-form button")[0].click()
        wait(driver, lambda d: "wrong API key" in by_id(d, "key-error").text)
        by_id(driver, "api-key").clear()
        by_id(driver, "api-key").send_keys(API_KEY)
        css(driver, "#key-form button")[0].click()
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))
    assert not by_id(driver, "key-form").is_displayed()


def set_value(driver, element_id, value):
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(str(value))


def choose(driver, element_id, value):
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, element_id)).select_by_value(value)


def open_section(driver, title):
    from selenium.webdriver.common.by import By

    summary = driver.find_element(By.XPATH, f"//summary[contains(., '{title}')]")
    if summary.find_element(By.XPATH, "..").get_attribute("open") is None:
        summary.click()


def sent_body(driver) -> dict:
    """The request the page will send, as its JSON snippet shows it."""
    return json.loads(driver.execute_script("return document.getElementById('snippet-json')"
                                            ".textContent"))


def steering_report(http, body: dict) -> dict:
    """The server's steering report for the page's request, asked for again without a stream
    (the same seed gives the same answer)."""
    return http.post("/v1/chat/completions", json={**body, "stream": False}).json()[
        "choices"][0]["steering"]


def send_and_wait(driver, panes=("steered",)):
    by_id(driver, "send").click()
    for pane in panes:
        wait(driver, lambda d, p=pane: by_id(d, f"pane-{p}").get_attribute("data-state")
             in ("done", "error"), STREAM_TIMEOUT_S)


def shown_tokens(driver, pane="steered"):
    return [(t.get_attribute("textContent"), t.get_attribute("data-entropy"),
             t.get_attribute("data-bucket"))
            for t in css(driver, f"#pane-{pane} .answer.latest .tok")]


def test_typical_and_east_stream_what_the_server_answers(browser, server, http):
    open_page(browser, server)
    assert by_id(browser, "model-name").text == "SmolLM2-135M-Instruct"
    assert "8192" in by_id(browser, "model-context").text
    set_value(browser, "prompt", "Describe the sea at night in two sentences.")
    set_value(browser, "max-tokens", 24)
    set_value(browser, "temperature", 0.8)
    set_value(browser, "seed", 7)
    open_section(browser, "Locally typical sampling")
    by_id(browser, "typical-on").click()
    set_value(browser, "typical-p", 0.9)
    open_section(browser, "EAST")
    choose(browser, "east-vector", "explore")
    set_value(browser, "east-scale", 1.5)
    by_id(browser, "compare").click()
    body = sent_body(browser)
    assert body["steering"]["typical"] == {"p": 0.9}
    assert body["steering"]["east"] == {"vector": "explore", "scale": 1.5}
    send_and_wait(browser, ("steered", "plain"))
    assert by_id(browser, "error").text == ""

    # The same request, not streamed: the tokens shown are the server's, with its entropies.
    answer = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
    choice = answer["choices"][0]
    tokens = [c["token"] for c in choice["logprobs"]["content"]]
    entropy = choice["steering"]["token_entropy"]
    shown = shown_tokens(browser)
    assert [text for text, _, _ in shown] == tokens
    assert [float(h) for _, h, _ in shown] == pytest.approx(entropy, abs=1e-4)

    # Each token's colour is its entropy bucket's, as the legend shows it.
    swatches = {s.get_attribute("data-bucket"): s.value_of_css_property("background-color")
                for s in css(browser, "#legend .swatch")}
    assert len(set(swatches.values())) == len(swatches) == len(ENTROPY_EDGES) + 2
    spans = css(browser, "#pane-steered .answer.latest .tok")
    for span, h in zip(spans, entropy):
        assert span.get_attribute("data-bucket") == expected_bucket(h)
        assert span.value_of_css_property("background-color") == swatches[expected_bucket(h)]

    # One chart point per token, for both answers side by side.
    assert len(css(browser, "#chart circle.pt.steered")) == len(tokens)
    assert len(css(browser, "#chart circle.pt.plain")) == len(css(
        browser, "#pane-plain .answer.latest .tok")) > 0
    report = by_id(browser, "methods-view").text
    assert "Locally typical sampling: p 0.9" in report and "EAST: explore × 1.5" in report

    # Hovering a token shows its numbers and the top alternatives.
    from selenium.webdriver import ActionChains

    ActionChains(browser).move_to_element(spans[0]).perform()
    tip = by_id(browser, "tooltip")
    wait(browser, lambda d: tip.is_displayed())
    assert f"entropy {entropy[0]:.3f}" in tip.text
    assert len(tip.find_elements("css selector", "tbody tr")) == 5
    browser.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.write_bytes(browser.get_screenshot_as_png())


def test_keyboard_moves_between_tokens_and_phone_width_fits(browser, server):
    open_page(browser, server)
    set_value(browser, "max-tokens", 8)
    set_value(browser, "seed", 1)
    send_and_wait(browser)
    from selenium.webdriver.common.keys import Keys

    css(browser, "#pane-steered .answer.latest")[0].send_keys(Keys.ARROW_RIGHT)  # first token
    assert browser.switch_to.active_element.get_attribute("data-index") == "0"
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    active = browser.switch_to.active_element
    assert active.get_attribute("data-index") == "1"
    assert by_id(browser, "tooltip").is_displayed()
    active.send_keys(Keys.ESCAPE)
    assert not by_id(browser, "tooltip").is_displayed()
    try:
        browser.set_window_size(390, 844)
        width = browser.execute_script("return window.innerWidth")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        # the answer comes before the options on a phone
        answer_top = browser.execute_script(
            "return document.querySelector('.output').getBoundingClientRect().top")
        options_top = browser.execute_script(
            "return document.querySelector('.options').getBoundingClientRect().top")
        assert answer_top < options_top
    finally:
        browser.set_window_size(1280, 800)


def test_particle_filter_view_streams_each_iteration(browser, server):
    open_page(browser, server)
    set_value(browser, "prompt", "Count from one to five.")
    set_value(browser, "max-tokens", 24)
    set_value(browser, "seed", 3)
    open_section(browser, "Particle filter")
    by_id(browser, "particles-on").click()
    set_value(browser, "particles-n", 3)
    set_value(browser, "particles-max-steps", 3)
    set_value(browser, "particles-step-delimiter", " ")
    body = sent_body(browser)
    assert body["steering"]["particles"] == {"n": 3, "max_steps": 3, "step_delimiter": " "}
    assert "logprobs" not in body
    send_and_wait(browser)
    assert by_id(browser, "error").text == ""
    steps = css(browser, "#particles-view .pf-step")
    assert 1 <= len(steps) <= 3
    for step in steps:
        weights = [float(w.get_attribute("data-weight"))
                   for w in step.find_elements("css selector", ".weight")]
        assert len(weights) == 3 and sum(weights) == pytest.approx(1.0)
        assert "ESS" in step.text
    assert "chosen particle" in css(browser, "#particles-view .pf-final")[0].text
    status = css(browser, "#pane-steered .status")[0].text
    count = int(status.split(" tokens")[0])
    assert count > 0 and len(css(browser, "#chart circle.pt.steered")) == count
    by_id(browser, "particles-on").click()  # off again for the tests after this one


def test_deepconf_view_shows_each_trace_and_the_vote(browser, server, http):
    """DeepConf offline, 3 traces: one row per trace as its events stream in, then the vote as
    bars and the chosen trace, as the server's report (asked for again, same seed) has them."""
    open_page(browser, server)
    set_value(browser, "prompt", "What is 12 times 7?")
    set_value(browser, "max-tokens", 16)
    set_value(browser, "seed", 3)
    open_section(browser, "DeepConf")
    by_id(browser, "deepconf-on").click()
    choose(browser, "deepconf-mode", "offline")
    set_value(browser, "deepconf-budget", 3)
    set_value(browser, "deepconf-window", 8)
    body = sent_body(browser)
    assert body["steering"]["deepconf"] == {"mode": "offline", "budget": 3, "window": 8}
    assert "logprobs" not in body and "top_logprobs" not in body
    send_and_wait(browser)
    assert by_id(browser, "error").text == ""
    report = steering_report(http, body)["deepconf"]
    rows = css(browser, "#deepconf-view .dc-trace")
    assert sorted(int(r.get_attribute("data-trace")) for r in rows) == [0, 1, 2]
    assert all("finished" in r.text for r in rows)
    assert by_id(browser, "deepconf-view").is_displayed()
    assert css(browser, "#deepconf-view .dc-threshold")
    bars = {b.get_attribute("data-answer"): b for b in css(browser, "#deepconf-view .dc-vote")}
    assert set(bars) == set(report["votes"])
    total = sum(report["votes"].values())
    for answer, weight in report["votes"].items():
        assert f"{100 * weight / total:.1f}%" in bars[answer].text
    final = css(browser, "#deepconf-view .dc-final")[0].text
    assert f"chosen trace {report['chosen']}" in final
    assert f"{report['generated_tokens']} tokens generated" in final
    assert "DeepConf" not in by_id(browser, "methods-view").text
    by_id(browser, "deepconf-on").click()  # off again for the tests after this one


def test_gate_and_v_reason_markers_and_the_difficulty_view(browser, server, http):
    """A gate, V-Reason and DiffAdapt in one request: the chart marks exactly the tokens the
    server's report names, and the DiffAdapt view shows its class probabilities."""
    open_page(browser, server)
    set_value(browser, "prompt", "What is 12 times 7?")
    set_value(browser, "max-tokens", 24)
    set_value(browser, "seed", 5)
    open_section(browser, "DiffAdapt")
    choose(browser, "diffadapt-probe", "default")
    open_section(browser, "Entropy gates")
    by_id(browser, "add-gate").click()
    set_value(browser, "gate0-value", 0.3)
    open_section(browser, "V-Reason")
    by_id(browser, "vreason-on").click()
    body = sent_body(browser)
    assert "temperature" not in body  # DiffAdapt's strategies set it
    assert body["steering"]["gates"] == [
        {"signal": "entropy", "above": 2, "hold": 1, "then": {"temperature": 0.3}}]
    assert body["steering"]["vreason"] == {} and body["steering"]["diffadapt"] == {
        "probe": "default"}
    send_and_wait(browser)
    assert by_id(browser, "error").text == ""
    report = steering_report(http, body)

    def marked(kind):
        return sorted(int(m.get_attribute("data-index"))
                      for m in css(browser, f"#chart path.marker.{kind}.steered"))

    assert marked("gate") == report["gates"]["gates"][0]["fired"]
    assert marked("vreason") == [u["token"] for u in report["vreason"]["updates"]]
    assert marked("gate") and marked("vreason")
    difficulty = by_id(browser, "diffadapt-view")
    assert difficulty.is_displayed()
    assert report["diffadapt"]["difficulty"] in difficulty.text
    assert f"({report['diffadapt']['recipe']} recipe)" in difficulty.text
    bars = {b.get_attribute("data-class"): b.text for b in css(browser, "#diffadapt-view .bar")}
    assert bars == {name: f"{name} {100 * p:.1f}%"
                    for name, p in report["diffadapt"]["probabilities"].items()}


def test_a_diffadapt_class_and_continuation_are_sent_and_shown(browser, server, http):
    """The class and continuation controls (the class list from the server's schema) reach
    the request; the view shows the class without probabilities, and the continuation the
    server's report gives (a 4-token Hard budget cuts the answer off)."""
    open_page(browser, server)
    set_value(browser, "prompt", "What is 12 times 7?")
    set_value(browser, "max-tokens", 8)
    set_value(browser, "seed", 3)
    open_section(browser, "DiffAdapt")
    choose(browser, "diffadapt-probe", "paper")
    choose(browser, "diffadapt-difficulty", "hard")
    choose(browser, "diffadapt-continuation", "true")
    body = sent_body(browser)
    assert body["steering"]["diffadapt"] == {"probe": "paper", "difficulty": "hard",
                                             "continuation": True}
    send_and_wait(browser)
    assert by_id(browser, "error").text == ""
    report = steering_report(http, body)["diffadapt"]
    view = by_id(browser, "diffadapt-view").text
    assert report["continued"] is not None and "(paper recipe): hard" in view
    assert not css(browser, "#diffadapt-view .bar")
    assert f"{report['continued']['tokens']} tokens ({report['continued']['finish_reason']})" \
        in view


def test_errors_show_the_server_message(browser, server, http):
    open_page(browser, server)
    open_section(browser, "EAST")
    choose(browser, "east-vector", "explore")
    set_value(browser, "east-layer", 999)
    body = sent_body(browser)
    expected = http.post("/v1/chat/completions", json=body)
    assert expected.status_code == 400
    send_and_wait(browser)
    assert by_id(browser, "error").text == expected.json()["error"]["message"]
    assert by_id(browser, "pane-steered").get_attribute("data-state") == "error"
    # A key that stops working mid-session: the server's 401 message, and the key form again.
    browser.execute_script("sessionStorage.setItem('entropy-steer-api-key', 'revoked')")
    browser.refresh()
    wait(browser, lambda d: by_id(d, "key-form").is_displayed())
    assert "wrong API key" in by_id(browser, "key-error").text
    by_id(browser, "api-key").send_keys(API_KEY)
    css(browser, "#key-form button")[0].click()
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))


def test_every_method_without_a_view_of_its_own_gets_a_panel_from_the_schema(browser, server,
                                                                              http):
    """A method joins the page with its registry line alone: each `steering` field that is an
    options model (and has no view of its own) gets a panel titled by the model, with one input
    per scalar field; switched on, it is sent, and the server answers it with its section."""
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    own_views = {"east", "diffadapt", "gates", "return_entropy", "return_hidden_states"}
    models = {}
    for name, field in schemas["SteeringOptions"]["properties"].items():
        ref = next((v["$ref"] for v in field.get("anyOf", [field]) if "$ref" in v), None)
        if name not in own_views and ref is not None:
            models[name] = schemas[ref.split("/")[-1]]
    panels = {p.get_attribute("data-method"): p for p in css(browser, "#method-panels details")}
    assert set(panels) == set(models) and len(models) >= 4
    set_value(browser, "prompt", "Name a colour.")
    set_value(browser, "max-tokens", 8)
    set_value(browser, "seed", 2)
    for name, model in models.items():
        assert panels[name].find_element(By.TAG_NAME, "summary").text == model["title"]
        scalars = [f for f, p in model["properties"].items()
                   if "array" not in (p.get("type"), *(v.get("type") for v in p.get("anyOf", [])))]
        assert scalars and all(by_id(browser, f"{name}-{f.replace('_', '-')}") for f in scalars)
        open_section(browser, model["title"])
        by_id(browser, f"{name}-on").click()
        body = sent_body(browser)
        assert set(body["steering"]) == {name, "return_entropy"}
        send_and_wait(browser)
        assert by_id(browser, "error").text == "", name
        assert name in steering_report(http, body), name
        by_id(browser, f"{name}-on").click()  # off again for the next one
