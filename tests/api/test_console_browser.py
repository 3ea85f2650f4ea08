"""The console in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium):
log in, create and revoke a key and watch the revocation stop a live SDK call, find an SDK request on the
overview and in the recent decisions with its reason, see a team session hold no other team's data, and see
a write without its CSRF token refused. Every page is screenshotted into test-artifacts/console/."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.api_gateway import ADMIN_KEY, Gateway

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
PAGES = ("overview", "teams", "usage", "savings", "backends", "edge", "batches", "audit")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):  # .ci/run installs them: in CI a missing browser is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,900"):
        options.add_argument(arg)
    # Selenium logs each command at DEBUG, typed keys included: the log scan must not find them there.
    logging.getLogger("selenium").setLevel(logging.INFO)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.implicitly_wait(5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield drv
    finally:
        drv.quit()


def _until(drv: WebDriver, check: Callable[[WebDriver], object], what: str) -> None:
    """Wait for the page a click or submit leads to: the old page answers until it is replaced."""

    def ready(d: WebDriver) -> object:
        try:
            return check(d)
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    WebDriverWait(drv, 20, poll_frequency=0.1).until(ready, what)


def _shot(drv: WebDriver, name: str) -> None:
    drv.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _log_in(drv: WebDriver, base_url: str, key: str) -> None:
    drv.delete_all_cookies()
    drv.get(base_url + "/console/login")
    field = drv.find_element(By.ID, "key")
    field.send_keys(key)
    field.submit()
    _until(drv, lambda d: d.current_url.endswith("/console/overview"), "the overview after login")


def _cookie_client(drv: WebDriver, base_url: str) -> httpx.Client:
    """An HTTP client with the browser's session cookie: the JSON behind the pages, as the browser sees it."""
    client = httpx.Client(base_url=base_url)
    for c in drv.get_cookies():
        client.cookies.set(c["name"], c["value"], path=c.get("path", "/"))
    return client


def test_admin_creates_and_revokes_a_key_and_the_sdk_sees_it(browser: WebDriver, gateway: Gateway) -> None:
    _log_in(browser, gateway.base_url, ADMIN_KEY)
    _shot(browser, "overview-admin")
    browser.find_element(By.LINK_TEXT, "Teams and keys").click()
    browser.find_element(By.ID, "k-team").send_keys("alpha")
    name = "browser-" + uuid.uuid4().hex[:6]
    browser.find_element(By.ID, "k-name").send_keys(name)
    browser.find_element(By.ID, "k-usd").send_keys("5")
    browser.find_element(By.XPATH, "//button[text()='Create key']").click()
    _shot(browser, "teams-after-create")
    plaintext = browser.find_element(By.ID, "new-key").get_attribute("value") or ""
    assert plaintext.startswith("sk-sb-")
    _shot(browser, "teams-new-key")
    row = browser.find_element(By.XPATH, f"//table[@id='keys']//tr[td[3]='{name}']")
    key_id = row.get_attribute("data-key-id")
    assert "active" in row.text and "$5.00/month" in row.text
    sdk = OpenAI(base_url=gateway.v1, api_key=plaintext, max_retries=0)
    answer = sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello"}])
    assert answer.choices
    # Shown once: reloading the page shows the key's id, never the key.
    browser.get(gateway.base_url + "/console/teams")
    assert plaintext not in browser.page_source and key_id in browser.page_source
    browser.execute_script("window.confirm = function () { return true; };")
    browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Revoke key {key_id}']").click()
    row_xpath = f"//table[@id='keys']//tr[@data-key-id='{key_id}']"
    _until(
        browser,
        lambda d: "revoked" in d.find_element(By.XPATH, row_xpath).find_element(By.CLASS_NAME, "state").text,
        "the key shown revoked",
    )
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "again"}])
    browser.get(gateway.base_url + "/console/audit")
    audit = browser.find_element(By.ID, "audit").text
    assert f"key.revoke {key_id}" in audit.replace("\n", " ") or ("key.revoke" in audit and key_id in audit)
    _shot(browser, "audit")


def test_an_sdk_request_shows_on_the_overview_and_in_decisions(browser: WebDriver, gateway: Gateway) -> None:
    _log_in(browser, gateway.base_url, ADMIN_KEY)
    before = int(browser.find_element(By.ID, "tile-requests").text.replace(",", ""))
    sdk = OpenAI(base_url=gateway.v1, api_key=gateway.key("alpha"), max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "route me"}]
    )
    request_id = raw.headers["x-request-id"]
    row = gateway.usage_row(request_id)
    assert row["route_reason"]
    browser.get(gateway.base_url + "/console/overview")
    assert int(browser.find_element(By.ID, "tile-requests").text.replace(",", "")) > before
    assert browser.find_element(By.CSS_SELECTOR, "svg.chart")  # the charts are drawn
    browser.get(gateway.base_url + "/console/backends")
    decision = browser.find_element(By.CSS_SELECTOR, f"tr[data-request-id='{request_id}']")
    assert decision.find_element(By.CLASS_NAME, "reason").text == row["route_reason"]
    assert "fast" in decision.text
    _shot(browser, "backends")
    # The explain form, from the keyboard's point of view: labelled fields, a submit button.
    browser.find_element(By.ID, "x-model").send_keys("fast")
    browser.find_element(By.XPATH, "//button[text()='Explain']").click()
    assert browser.find_element(By.ID, "explain-reason").text
    _shot(browser, "explain")
    for page in PAGES:
        browser.get(f"{gateway.base_url}/console/{page}")
        assert browser.find_element(By.TAG_NAME, "h1").text
        unlabelled = browser.execute_script(
            "return Array.from(document.querySelectorAll('main input:not([type=hidden]), main select'))"
            ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.name)"
        )
        assert unlabelled == [], (page, unlabelled)
        _shot(browser, f"page-{page}")


def test_team_view_holds_no_other_team(browser: WebDriver, gateway: Gateway) -> None:
    alpha = OpenAI(base_url=gateway.v1, api_key=gateway.key("alpha", name="alpha-secret-name"), max_retries=0)
    alpha.chat.completions.create(model="fast", messages=[{"role": "user", "content": "alpha traffic"}])
    beta_key = gateway.key("beta", name="beta-own")
    OpenAI(base_url=gateway.v1, api_key=beta_key, max_retries=0).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "beta traffic"}]
    )
    time.sleep(0.3)  # the ledger writer flushes every 20 ms here
    _log_in(browser, gateway.base_url, beta_key)
    for page in ("overview", "teams", "usage"):
        browser.get(f"{gateway.base_url}/console/{page}")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "alpha" not in text, page
        _shot(browser, f"team-{page}")
    browser.get(gateway.base_url + "/console/teams")
    assert "beta-own" in browser.page_source and "alpha-secret-name" not in browser.page_source
    browser.get(gateway.base_url + "/console/audit")
    assert "for admins" in browser.find_element(By.TAG_NAME, "body").text
    with _cookie_client(browser, gateway.base_url) as c:
        for path in ("/console/api/overview?range=24h", "/console/api/keys", "/console/api/decisions"):
            resp = c.get(path)
            assert resp.status_code == 200, path
            assert "alpha" not in resp.text and "beta" in resp.text, path


def test_a_write_without_the_csrf_token_is_refused(browser: WebDriver, gateway: Gateway) -> None:
    _log_in(browser, gateway.base_url, ADMIN_KEY)
    browser.get(gateway.base_url + "/console/teams")
    team = "nocsrf-" + uuid.uuid4().hex[:6]
    browser.execute_script("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove());")
    browser.find_element(By.ID, "t-name").send_keys(team)
    browser.find_element(By.XPATH, "//button[text()='Create team']").click()
    _until(
        browser,
        lambda d: "security token is missing" in d.find_element(By.TAG_NAME, "body").text,
        "the refusal page",
    )
    _shot(browser, "csrf-refused")
    browser.get(gateway.base_url + "/console/teams")
    assert team not in browser.find_element(By.ID, "teams").text
