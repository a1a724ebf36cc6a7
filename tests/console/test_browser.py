"""graft-console in a real headless Chromium (Debian's, through its chromedriver), over waitress.

A real repository with two trained versions, a real graft-serve on it: the pages
show the right data, the report images load, and a rollback made in the browser
moves the label, which the running graft-serve then follows. The browser must
start: a missing one fails these tests, it never skips them.
"""

from __future__ import annotations

import re
import time

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from graft import contract
from tests.console.conftest import MODEL, TOKEN, console_server, copy_repo, make_app
from tests.ports import free_port
from tests.serving.server import serving
from training import repo as model_repo

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, from the paths .ci/run installs (Selenium Manager downloads nothing)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(trained, tmp_path_factory):
    """A private repository, graft-serve on it (fast polling), a down server, and the console over both."""
    repo = copy_repo(trained, tmp_path_factory.mktemp("browser") / "repo")
    down = f"http://127.0.0.1:{free_port()}"
    with serving(model_name=MODEL, model_base_path=str(repo / MODEL), file_system_poll_wait_seconds=0.2) as (_, client):
        deadline = time.monotonic() + 60
        # Ready means a version is AVAILABLE; the label applies once its own version is.
        while client.http.get(f"{client.rest}/v1/models/{MODEL}/labels/stable", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "graft-serve never applied the stable label"
            time.sleep(0.1)
        app = make_app(trained, repo, serve_urls=[client.rest, down])
        with console_server(app) as url:
            yield {"repo": repo, "console": url, "serve": client.rest, "down": down, "http": client.http}


def _submit(browser, form) -> None:
    """Submit ``form`` and wait until the browser has left its page (the answer is then loaded)."""
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(expected_conditions.staleness_of(form))
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda driver: driver.execute_script("return document.readyState") == "complete")


def _served_version(http, rest: str, label: str) -> str:
    answer = http.get(f"{rest}/v1/models/{MODEL}/labels/{label}", timeout=5)
    answer.raise_for_status()
    return answer.json()["model_version_status"][0]["version"]


def test_the_models_page_shows_labels_live_state_and_request_counts(browser, stack):
    image = [[[128.0] * 3] * 32] * 32
    for _ in range(3):
        assert stack["http"].post(f"{stack['serve']}/v1/models/{MODEL}:predict",
                                  json={"instances": [image]}, timeout=30).status_code == 200
    assert stack["http"].post(f"{stack['serve']}/v1/models/{MODEL}:predict",
                              json={"signature_name": "nope", "instances": [image]}, timeout=30).status_code == 400
    browser.get(stack["console"] + "/")
    section = browser.find_element(By.ID, f"model-{MODEL}")
    assert "stable → 2" in section.text
    rows = {row.find_element(By.CSS_SELECTOR, "td").text: row.text
            for row in section.find_elements(By.CSS_SELECTOR, "table.served tr")[1:]}
    assert "2: AVAILABLE" in rows[stack["serve"]] and "(4 total)" in rows[stack["serve"]]
    assert "(1 total, 25.0 %)" in rows[stack["serve"]]
    assert rows[stack["down"]].split()[1] == "down"
    assert "read-only" not in browser.find_element(By.ID, "mode").text
    browser.get(f"{stack['console']}/models/{MODEL}")
    shadows = browser.find_elements(By.CSS_SELECTOR, "section.shadow")
    assert [s.find_element(By.TAG_NAME, "h3").text for s in shadows] == [stack["serve"], stack["down"]]
    assert all("no shadow comparison" in s.text for s in shadows)


def test_the_version_page_shows_the_lineage_and_its_images_load(browser, stack):
    lineage = contract.read_lineage(stack["repo"] / MODEL / "2")
    browser.get(f"{stack['console']}/models/{MODEL}/versions/2")
    table = browser.find_element(By.ID, "lineage").text
    assert "vgg16" in table and lineage["dataset"]["fingerprint"] in table and "chosen by user" in table
    images = browser.find_elements(By.CSS_SELECTOR, "img.report-image")
    assert len(images) == 2
    for image in images:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        answer = requests.get(image.get_attribute("src"), timeout=10)
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png" and answer.content
    assert "serving_default" in browser.find_element(By.ID, "signatures").text


def test_the_history_page_shows_moves_and_a_diff(browser, stack):
    browser.get(f"{stack['console']}/models/{MODEL}/history")
    history = browser.find_element(By.ID, "history").text
    assert len(re.findall(r"\bpromote stable\b", history)) == 2
    differing = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#diff tr.differs")]
    assert any(row.startswith("dataset.fingerprint") for row in differing)


def test_a_rollback_in_the_browser_moves_the_label_and_graft_serve_follows(browser, stack):
    assert _served_version(stack["http"], stack["serve"], "stable") == "2"
    browser.get(f"{stack['console']}/models/{MODEL}")
    form = browser.find_element(By.ID, "rollback-form")
    form.find_element(By.NAME, "token").send_keys(TOKEN)
    _submit(browser, form)
    assert browser.find_element(By.ID, "decision").text.startswith("rolled_back: label 'stable' moved back from version 2 to 1")
    assert contract.read_labels(stack["repo"] / MODEL) == {"stable": 1}
    assert model_repo.read_history(stack["repo"] / MODEL)[-1]["action"] == "rollback"
    deadline = time.monotonic() + 60
    while _served_version(stack["http"], stack["serve"], "stable") != "1":
        assert time.monotonic() < deadline, "graft-serve did not follow the rollback"
        time.sleep(0.2)
    browser.get(stack["console"] + "/")
    assert "stable → 1" in browser.find_element(By.ID, f"model-{MODEL}").text


def test_an_action_without_the_token_is_refused_in_the_browser(browser, stack):
    labels = contract.read_labels(stack["repo"] / MODEL)
    browser.get(f"{stack['console']}/models/{MODEL}")
    form = browser.find_element(By.ID, "rollback-form")
    # The field is required; a client that strips that still meets the server's refusal.
    browser.execute_script("arguments[0].removeAttribute('required')", form.find_element(By.NAME, "token"))
    _submit(browser, form)
    assert browser.find_element(By.TAG_NAME, "h1").text == "403 Refused"
    assert "needs the bearer token" in browser.find_element(By.ID, "error").text
    assert contract.read_labels(stack["repo"] / MODEL) == labels


def test_a_read_only_console_offers_no_action(browser, trained):
    with console_server(make_app(trained, actions=False)) as url:
        browser.get(f"{url}/models/{MODEL}")
        assert browser.find_elements(By.CSS_SELECTOR, "form[method=post]") == []
        assert browser.find_element(By.ID, "mode").text == "read-only"
        answer = requests.post(f"{url}/models/{MODEL}/rollback", data={"label": "stable", "token": TOKEN},
                               timeout=10)
        assert answer.status_code == 403
