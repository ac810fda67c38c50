"""The web dashboard in a real browser: headless Chromium, driven by Selenium, against the real service.

A job is started through the page's form and followed on its page while a worker runs it: the
compression chart grows while the job runs, followed through its event stream (``document.body.dataset.live``
is ``"sse"``, not the polling fallback), the job reaches ``succeeded``, the per-layer bars show fc1/fc2/fc3
with fewer weights kept than there were, and the artifacts are listed and download.
A screenshot of the finished job's page is saved under ``$NETSURGERY_TEST_ARTIFACTS`` (a folder;
default ``<repo>/test-artifacts``) and in the test's tmp folder.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``)
and the ``selenium`` package; skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
import pytest

from tests.e2e.conftest import Service
from tests.e2e.test_service import _zoo_file, upload

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 2000  # 4 s of an idle 2-core CPU worker: the page polls the running job a few times
FINISHED = {"succeeded", "failed", "cancelled"}


def _missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install -y chromium chromium-driver); not found"
    if importlib.util.find_spec("selenium") is None:
        return "needs the selenium package (pip install selenium)"
    return None


pytestmark = pytest.mark.slow
# a mark, so the test is skipped before the (costly) service fixture starts, not inside it
needs_browser = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

T = TypeVar("T")


def artifacts_dir() -> Path:
    """Where the screenshots go: ``$NETSURGERY_TEST_ARTIFACTS`` if set, else ``<repo>/test-artifacts``."""
    folder = Path(os.environ.get("NETSURGERY_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile that reaches nothing but the service (no background traffic)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="netsurgery-chromium-") as profile:
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1280,1000",
            "--lang=en-US",  # the page formats numbers in the browser's locale
        ):
            options.add_argument(flag)
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait(driver: WebDriver, what: str, condition: Callable[[WebDriver], T | Literal[False]], timeout: float = 30) -> T:
    """``condition``'s first truthy answer within ``timeout`` s; on a timeout the page's status line says why."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(
            driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        ).until(condition)
    except TimeoutException:
        status = driver.execute_script("return document.querySelector('#status-line')?.textContent")
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status line: {status!r}") from None


def plotted(driver: WebDriver, chart: str) -> list[dict[str, Any]]:
    """The traces plotly.js drew in ``chart``: each one's name, mode, x and y (and customdata), and how
    many of its points (markers or bars) are on the page as SVG."""
    traces: list[dict[str, Any]] = driver.execute_script(
        """const div = document.querySelector(arguments[0]);
        if (!div || !div.data) return [];
        const groups = [...div.querySelectorAll('.scatterlayer .trace, .barlayer .trace')];
        return div.data.map((t, i) => ({name: t.name, mode: t.mode || t.type, x: Array.from(t.x || []),
            y: Array.from(t.y || []), customdata: t.customdata ? Array.from(t.customdata) : null,
            drawn: groups[i] ? groups[i].querySelectorAll('.point').length : 0,
            line: groups[i] ? (groups[i].querySelector('path.js-line') || {getAttribute: () => ''}).getAttribute('d')
                : ''}));""",
        chart,
    )
    return traces


def chart_points(driver: WebDriver, chart: str) -> int:
    """Points in the chart's first line; every one of them is a vertex of its drawn path."""
    traces = plotted(driver, chart)
    if not traces or not traces[0]["x"]:
        return 0
    first = traces[0]
    vertices = len(re.findall(r"[ML]", first["line"] or ""))
    assert len(first["x"]) == 1 or vertices >= 2, first  # drawn, not only data
    return len(first["x"])


def live_path(driver: WebDriver) -> str | None:
    """How the job page follows its job: ``"sse"`` (the event stream) or ``"poll"`` (the fallback)."""
    path: str | None = driver.execute_script("return document.body.dataset.live || null")
    return path


def page_state(driver: WebDriver) -> str | None:
    state: str | None = driver.execute_script("return document.querySelector('#job-state').dataset.state || null")
    return state


def save_screenshot(driver: WebDriver, name: str, tmp_path: Path, width: int = 1280) -> Path:
    """The whole page as PNG in the artifacts folder and in ``tmp_path``; the former's path."""
    driver.set_window_size(width, 800)
    height = int(driver.execute_script("window.scrollTo(0, 0); return document.documentElement.scrollHeight"))
    driver.set_window_size(width, max(height + 160, 800))  # the window's height includes its frame
    time.sleep(0.3)  # let the resize lay out
    out = artifacts_dir() / name
    assert driver.save_screenshot(str(out))
    assert driver.save_screenshot(str(tmp_path / name))
    return out


@needs_browser
def test_dashboard_starts_and_follows_a_job(service: Service, browser: WebDriver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    started = time.monotonic()
    with service.client() as c:
        model = upload(c, "/v1/models", _zoo_file(tmp_path / "lenet.safetensors"), architecture="lenet-300-100")
        r = c.post("/v1/datasets", json={"builtin": "digits", "name": "digits"})
        assert r.status_code == 201, r.text
        dataset = r.json()

    # the front page is the dashboard, and the HTML itself needs no key
    browser.get(service.url + "/")
    assert browser.current_url == service.url + "/dashboard/"
    key_input = browser.find_element(By.ID, "key-input")
    wait(browser, "the key form", lambda d: key_input.is_displayed())

    # a wrong key is refused with the reason, the right one opens the job list
    key_input.send_keys("ns_not-a-key")
    browser.find_element(By.ID, "key-submit").click()
    error = wait(browser, "the refusal", lambda d: d.find_element(By.ID, "key-error").text)
    assert "not accepted" in error
    key_input.clear()
    key_input.send_keys(service.key)
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, "the job list", lambda d: d.find_element(By.ID, "list-view").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('netsurgery.apiKey')") == service.key

    # the form, with the choices the API lists
    wait(
        browser,
        "the model and data choices",
        lambda d: (
            d.execute_script(
                "return [...document.querySelectorAll('#model-select option, #dataset-select option')]"
                ".map(o => o.value)"
            )
            == [model["id"], dataset["id"]]
        ),
    )
    Select(browser.find_element(By.ID, "model-select")).select_by_value(model["id"])
    Select(browser.find_element(By.ID, "dataset-select")).select_by_value(dataset["id"])
    Select(browser.find_element(By.ID, "method-select")).select_by_value("dns")
    for field, value in (("target-compression", "8"), ("max-accuracy-drop", "10"), ("iterations", str(ITERATIONS))):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    # the method's settings, folded away until asked for; the crate-driven method's own ones stay hidden
    browser.find_element(By.CSS_SELECTOR, "#job-settings summary").click()
    assert not browser.find_element(By.ID, "setting-crate").is_displayed()
    for field, value in (("setting-lr", "0.02"), ("setting-seed", "3"), ("setting-include", "fc*")):
        browser.find_element(By.ID, field).send_keys(value)
    Select(browser.find_element(By.ID, "setting-first-last")).select_by_value("dense")
    browser.find_element(By.ID, "job-name-input").send_keys("from the form")
    browser.find_element(By.ID, "job-tags-input").send_keys("browser, lenet")
    browser.find_element(By.ID, "start-job").click()

    # the page of the job it started
    match = wait(browser, "the job's page", lambda d: re.search(r"#/jobs/([0-9a-f-]{36})$", d.current_url) or False)
    job_id = match.group(1)
    with service.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert (job["model_id"], job["dataset_id"], job["method"]) == (model["id"], dataset["id"], "dns")
    assert job["target"] == {"compression": 8, "max_accuracy_drop": 10}
    assert job["settings"] == {
        "iterations": ITERATIONS,
        "lr": 0.02,
        "seed": 3,
        "include": ["fc*"],
        "first_last": "dense",
    }
    assert (job["name"], job["tags"]) == ("from the form", ["browser", "lenet"])
    assert job["idempotency_key"].startswith("dashboard-")

    # watch the compression chart while the job runs: (points, state shown) every 0.2 s until it finishes,
    # and which way the page follows it (its event stream, or polling as the fallback)
    seen: list[tuple[int, str | None]] = []
    live: list[tuple[str | None, str | None]] = []
    deadline = time.monotonic() + 180  # a busy machine
    while True:
        seen.append((chart_points(browser, "#chart-compression"), page_state(browser)))
        live.append((seen[-1][1], live_path(browser)))
        if seen[-1][1] in FINISHED:
            break
        if time.monotonic() > deadline:
            with service.client() as c:
                now = c.get(f"/v1/jobs/{job_id}").json()
            status = browser.find_element(By.ID, "status-line").text
            worker_log = (service.folder / "w1.log").read_text()[-3000:]
            raise AssertionError(f"the page shows {seen[-3:]} (status {status!r}); the API: {now}\n{worker_log}")
        time.sleep(0.2)
    running = [n for n, state in seen if state == "running" and n > 0]
    print(f"compression chart points while running: {sorted(set(running))}")
    assert len(set(running)) >= 2 and running == sorted(running), f"the chart did not grow while running: {seen}"
    assert seen[-1][1] == "succeeded", browser.find_element(By.ID, "job-error").text
    # the running job was followed through its event stream, never by the polling fallback
    assert any(state == "running" for state, _ in live), live
    assert {path for state, path in live if state == "running"} == {"sse"}, live
    assert live_path(browser) == "sse"

    # the finished page: charts hold every progress point, the layer bars, the artifacts
    with service.client() as c:
        progress = c.get(f"/v1/jobs/{job_id}/progress", params={"limit": 1000}).json()["items"]
        listing = c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
        final = c.get(f"/v1/jobs/{job_id}").json()
    assert chart_points(browser, "#chart-compression") == sum(p["compression"] is not None for p in progress)
    assert chart_points(browser, "#chart-accuracy") == sum(p["val_accuracy"] is not None for p in progress) > 0
    assert chart_points(browser, "#chart-layer-history") > 0
    assert browser.find_element(By.CSS_SELECTOR, '#job-summary [data-field="iteration"] dd').text.replace(",", "") == (
        f"{ITERATIONS} / {ITERATIONS}"
    )
    assert browser.find_element(By.ID, "job-error-box").is_displayed() is False
    assert browser.find_element(By.ID, "cancel-button").is_displayed() is False
    # the verdict: accuracy before and after, the budget, the size on disk; reference and budget lines drawn
    wait(browser, "the result fields", lambda d: d.find_elements(By.CSS_SELECTOR, '#job-summary [data-field="size"]'))
    summary = {
        dl.get_attribute("data-field"): dl.find_element(By.TAG_NAME, "dd").text
        for dl in browser.find_elements(By.CSS_SELECTOR, "#job-summary [data-field]")
    }
    result = final["result"]
    assert summary["budget_met"] == "met (10 pt)"
    assert re.fullmatch(r"\d+\.\d\d % → \d+\.\d\d % \([−+]\d+\.\d\d\)", summary["result_val"]), summary
    assert f"{result['val_acc']:.2f} %" in summary["result_val"]
    assert re.fullmatch(r"[\d.]+ [KM]iB → [\d.]+ KiB \(\d+\.\d× smaller\)", summary["size"]), summary
    accuracy_labels = browser.find_element(By.ID, "chart-accuracy").text
    assert "reference" in accuracy_labels and "budget" in accuracy_labels

    before, after = plotted(browser, "#layers-chart")
    assert before["y"] == after["y"] == ["fc1", "fc2", "fc3"] and before["drawn"] == after["drawn"] == 3
    text = browser.find_element(By.ID, "layers-chart").text
    for name, (kept, total), share in zip(after["y"], after["customdata"], after["x"], strict=True):
        if name == "fc3":  # the head: small beside what 8x keeps, so kept dense, and drawn whole
            assert kept == total and share == 100, (name, kept, total)
        else:
            assert 0 < kept < total and 0 < share < 100, (name, kept, total)
        assert abs(share - 100 * kept / total) < 1e-9 and f"{100 * kept / total:.1f}%" in text, (name, text)
    totals = [total for _, total in after["customdata"]]
    assert totals == [784 * 300 + 300, 300 * 100 + 100, 100 * 10 + 10]  # weights and biases

    links = wait(
        browser, "the artifact links", lambda d: d.find_elements(By.CSS_SELECTOR, "#artifacts a.artifact-link")
    )
    names = {link.get_attribute("data-artifact") for link in links}
    assert names == {a["name"] for a in listing} and {"model.safetensors", "report.json"} <= names
    # a download goes through fetch with the key, is checked against its sha256, then saved from a Blob URL
    report_link = next(link for link in links if link.get_attribute("data-artifact") == "report.json")
    report_link.click()
    saving = browser.find_element(By.CSS_SELECTOR, '#artifacts li[data-artifact="report.json"] [data-role="status"]')
    wait(browser, "the download", lambda d: saving.text not in ("", "downloading…"))
    assert saving.text == "saved, sha256 checked"
    saved = tmp_path / "downloads" / "report.json"
    wait(browser, "the saved file", lambda d: saved.exists() and saved.stat().st_size > 0, timeout=10)
    assert json.loads(saved.read_text())["inputs"]["model"]["sha256"] == model["sha256"]

    # report.html, viewed in the page: fetched with the key, drawn in a sandboxed frame with its charts
    browser.find_element(By.ID, "view-report").click()
    wait(browser, "the report", lambda d: d.find_element(By.ID, "report-box").is_displayed())
    frame = browser.find_element(By.ID, "report-frame")
    assert frame.get_attribute("sandbox") == "allow-same-origin"  # no script, form, popup or navigation in it
    browser.switch_to.frame(frame)
    try:
        headings = wait(
            browser, "the report's sections", lambda d: [h.text for h in d.find_elements(By.TAG_NAME, "h2")]
        )
        assert {"Summary", "Layers", "Files"} <= set(headings), headings
        charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
        widths = browser.execute_script(
            "return [...document.querySelectorAll('svg.chart')].map(s => s.getBoundingClientRect().width)"
        )
        assert len(charts) >= 3 and all(w > 100 for w in widths), widths  # laid out and drawn
    finally:
        browser.switch_to.default_content()

    shot = save_screenshot(browser, "dashboard.png", tmp_path)

    # the job list shows it, finished
    browser.get(service.url + "/dashboard/#/")
    row = wait(
        browser, "the job's row", lambda d: d.find_elements(By.CSS_SELECTOR, f'#jobs-table tr[data-job-id="{job_id}"]')
    )
    assert row[0].get_attribute("data-state") == "succeeded"
    cells = {td.get_attribute("data-field"): td.text for td in row[0].find_elements(By.TAG_NAME, "td")}
    assert cells["state"] == "succeeded" and cells["method"] == "dns"
    assert cells["iteration"].replace(",", "") == f"{ITERATIONS} / {ITERATIONS}"
    assert cells["compression"].endswith("×") and cells["val_accuracy"].endswith("%")
    assert cells["budget_met"] == "met (10 pt)" and re.fullmatch(r"[−+]\d+\.\d\d", cells["val_drop"]), cells
    save_screenshot(browser, "dashboard-jobs.png", tmp_path)

    for png in (shot, tmp_path / "dashboard.png"):
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, (png, len(data))
    # no script error, refused resource or policy violation on the way (the wrong key's 401 was on purpose)
    logs: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]  # untyped in selenium
    problems = [e for e in logs if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not problems, problems
    print(f"dashboard test: {time.monotonic() - started:.1f}s, screenshot {shot}")


def sign_in(driver: WebDriver, service: Service) -> None:
    """Open the dashboard and give it the key through its form."""
    from selenium.webdriver.common.by import By

    driver.get(service.url + "/dashboard/")
    key_input = wait(driver, "the key form", lambda d: d.find_element(By.ID, "key-input"))
    key_input.send_keys(service.key)
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, "the job list", lambda d: d.find_element(By.ID, "list-view").is_displayed())


@needs_browser
def test_dashboard_shows_a_failure_and_cancels_a_running_job(
    service: Service, browser: WebDriver, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    np = pytest.importorskip("numpy")
    # data that does not fit the model: the worker fails the job with a sentence
    np.savez(tmp_path / "wrong.npz", inputs=np.zeros((50, 3, 32, 32), np.float32), targets=np.zeros(50, np.int64))
    with service.client() as c:
        model = upload(c, "/v1/models", _zoo_file(tmp_path / "m.safetensors"), architecture="lenet-300-100")
        wrong = upload(c, "/v1/datasets", tmp_path / "wrong.npz")
        digits = c.post("/v1/datasets", json={"builtin": "digits"}).json()
        body = {"model_id": model["id"], "method": "dns", "target": {"compression": 5}}
        failing = c.post("/v1/jobs", json=body | {"dataset_id": wrong["id"], "settings": {"iterations": 50}}).json()
        long = c.post("/v1/jobs", json=body | {"dataset_id": digits["id"], "settings": {"iterations": 10**6}}).json()

    sign_in(browser, service)
    browser.get(f"{service.url}/dashboard/#/jobs/{failing['id']}")
    wait(browser, "the failure", lambda d: page_state(d) == "failed", timeout=60)
    box = browser.find_element(By.ID, "job-error-box")
    assert box.is_displayed() and "do not fit the model" in browser.find_element(By.ID, "job-error").text
    assert not browser.find_element(By.ID, "cancel-button").is_displayed()
    assert wait(browser, "the artifacts note", lambda d: d.find_element(By.ID, "artifacts-note").text) == (
        "This job produced no artifacts."
    )
    save_screenshot(browser, "dashboard-failed-narrow.png", tmp_path, width=420)  # the phone-width layout
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

    # a running job, cancelled from its page: two clicks (the first only arms the button)
    browser.set_window_size(1280, 1000)
    browser.get(f"{service.url}/dashboard/#/jobs/{long['id']}")
    wait(browser, "the job running", lambda d: page_state(d) == "running", timeout=60)
    cancel = browser.find_element(By.ID, "cancel-button")
    wait(browser, "the cancel button", lambda d: cancel.is_displayed())
    cancel.click()
    assert cancel.text == "Click again to cancel" and page_state(browser) == "running"
    cancel.click()
    wait(browser, "the job cancelled", lambda d: page_state(d) == "cancelled", timeout=30)
    assert not browser.find_element(By.ID, "cancel-button").is_displayed()
    with service.client() as c:
        assert c.get(f"/v1/jobs/{long['id']}").json()["state"] == "cancelled"


def _digits_reference_and_data(service: Service, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A converged LeNet-300-100 on the built-in digits, uploaded, and that data set: a job's inputs."""
    from dns_core.data import load_digits
    from dns_core.io import save_model
    from dns_core.reference import train_reference

    train, _ = load_digits()
    save_model(tmp_path / "ref.safetensors", train_reference("lenet-300-100", train, epochs=15, device="cpu"),
               "lenet-300-100")  # fmt: skip
    with service.client() as c:
        model = upload(c, "/v1/models", tmp_path / "ref.safetensors", architecture="lenet-300-100")
        dataset = c.post("/v1/datasets", json={"builtin": "digits", "name": "digits"}).json()
    return model, dataset


@needs_browser
def test_dashboard_starts_a_budget_search_and_draws_its_frontier(
    service: Service, browser: WebDriver, tmp_path: Path
) -> None:
    """The form with no compression and a drop starts a budget-only job; its page draws accuracy against
    compression, one dot per judged rung, as the rungs end, then the verdict."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model, dataset = _digits_reference_and_data(service, tmp_path)
    sign_in(browser, service)
    wait(browser, "the model choice", lambda d: d.execute_script(
        "return [...document.querySelectorAll('#model-select option')].some(o => o.value === arguments[0])",
        model["id"]))  # fmt: skip
    Select(browser.find_element(By.ID, "model-select")).select_by_value(model["id"])
    Select(browser.find_element(By.ID, "dataset-select")).select_by_value(dataset["id"])
    Select(browser.find_element(By.ID, "method-select")).select_by_value("dns")
    for field, value in (("target-compression", ""), ("max-accuracy-drop", "2"), ("iterations", "3000")):
        box = browser.find_element(By.ID, field)
        box.clear()
        if value:
            box.send_keys(value)
    browser.find_element(By.ID, "start-job").click()
    match = wait(browser, "the job's page", lambda d: re.search(r"#/jobs/([0-9a-f-]{36})$", d.current_url) or False)
    job_id = match.group(1)
    with service.client() as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["target"] == {"max_accuracy_drop": 2}

    def dots(d: WebDriver) -> int:  # the frontier's points drawn on the page
        return sum(t["drawn"] for t in plotted(d, "#chart-frontier"))

    seen: list[tuple[int, str | None]] = []
    deadline = time.monotonic() + 180
    while (state := page_state(browser)) not in FINISHED:
        seen.append((dots(browser), state))
        assert time.monotonic() < deadline, seen[-3:]
        time.sleep(0.2)
    assert state == "succeeded", browser.find_element(By.ID, "job-error").text
    assert any(n > 0 and s == "running" for n, s in seen), f"no dot while the job ran: {seen}"
    with service.client() as c:
        frontier = c.get(f"/v1/jobs/{job_id}/frontier").json()
    wait(browser, "every rung's dot", lambda d: dots(d) == len(frontier["points"]))
    drawn = [[t["name"], x] for t in plotted(browser, "#chart-frontier") for x in t["x"]]
    points = frontier["points"]
    expected = [["within budget" if p["within_budget"] else "over budget", p["compression"]] for p in points]
    assert sorted(drawn) == sorted(expected)
    verdict = wait(browser, "the verdict", lambda d: d.find_element(By.ID, "frontier-verdict").text)
    assert verdict == frontier["verdict"] and "highest compression found" in verdict
    labels = browser.find_element(By.ID, "chart-frontier").text
    assert "reference" in labels and "budget" in labels  # the reference and the budget's floor are drawn
    assert browser.find_element(By.ID, "frontier-box").is_displayed()
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#frontier-candidates tbody tr")]
    assert len(rows) == len(frontier["candidates"]) >= 2, rows
    assert "(chosen)" in rows[0] and "model.sparse.safetensors" in rows[0] and "candidate-2" in rows[1]
    save_screenshot(browser, "dashboard-frontier.png", tmp_path)


@needs_browser
def test_dashboard_draws_the_frontier_of_a_job_that_asks_a_compression_and_a_budget(
    service: Service, browser: WebDriver, tmp_path: Path
) -> None:
    """A job that asks a compression within a budget climbs toward it in judged rungs: its page draws
    the same frontier box as a budget-only job's, one dot per judged rung, and its verdict."""
    from selenium.webdriver.common.by import By

    model, dataset = _digits_reference_and_data(service, tmp_path)
    with service.client() as c:
        target = {"compression": 6, "max_accuracy_drop": 2}
        job = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": dataset["id"], "method": "dns",
                                       "target": target, "settings": {"iterations": 3000}}).json()  # fmt: skip
        assert job["target"] == target, job

    sign_in(browser, service)
    browser.get(f"{service.url}/dashboard/#/jobs/{job['id']}")
    deadline = time.monotonic() + 180
    while (state := page_state(browser)) not in FINISHED:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state == "succeeded", browser.find_element(By.ID, "job-error").text
    with service.client() as c:
        frontier = c.get(f"/v1/jobs/{job['id']}/frontier").json()
        report = c.get(f"/v1/jobs/{job['id']}").json()
    points = frontier["points"]
    assert points and max(p["compression"] for p in points) <= 6 * 1.01, points  # the ask is the ceiling
    wait(browser, "every rung's dot", lambda d: sum(t["drawn"] for t in plotted(d, "#chart-frontier")) == len(points))
    assert browser.find_element(By.ID, "frontier-box").is_displayed()
    drawn = sorted([t["name"], x] for t in plotted(browser, "#chart-frontier") for x in t["x"])
    assert drawn == sorted(["within budget" if p["within_budget"] else "over budget", p["compression"]] for p in points)
    verdict = wait(browser, "the verdict", lambda d: d.find_element(By.ID, "frontier-verdict").text)
    assert verdict == frontier["verdict"], (verdict, frontier["verdict"], report.get("state"))
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#frontier-candidates tbody tr")]
    assert len(rows) == len(frontier["candidates"]) >= 1 and "(chosen)" in rows[0], rows


def test_dashboard_files_are_served_without_a_key_and_nothing_else(service: Service) -> None:
    import httpx

    with httpx.Client(base_url=service.url, timeout=10) as c:  # no Authorization header
        assert c.get("/").headers["location"] == "dashboard/"
        assert c.get("/dashboard").headers["location"] == "dashboard/"
        page = c.get("/", follow_redirects=True)
        assert page.status_code == 200 and str(page.url) == service.url + "/dashboard/"
        assert page.headers["content-type"].startswith("text/html") and 'id="jobs-table"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css"),
                                 ("plotly.min.js", "text/javascript")):  # fmt: skip
            r = c.get(f"/dashboard/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media_type), name
            assert r.headers["x-content-type-options"] == "nosniff"
        # only those files: no directory walk, no other file of the package
        for path in (
            "/dashboard/../app.py",
            "/dashboard/%2e%2e%2fapp.py",
            "/dashboard/nothing.js",
            "/dashboard/x/app.js",
        ):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path
        # the data is not: the API still wants its key
        assert c.get("/v1/jobs").status_code == 401
        assert "/dashboard/" not in c.get("/openapi.json").json()["paths"]


def sign_in_with(driver: WebDriver, service: Service, key: str) -> None:
    """Open the dashboard and give it ``key`` through its form."""
    from selenium.webdriver.common.by import By

    driver.get(service.url + "/dashboard/")
    key_input = wait(driver, "the key form", lambda d: d.find_element(By.ID, "key-input"))
    key_input.send_keys(key)
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, "the job list", lambda d: d.find_element(By.ID, "list-view").is_displayed())


def _finished_jobs(service: Service, tmp_path: Path, count: int) -> tuple[str, list[uuid.UUID]]:
    """A new tenant's key and ``count`` finished jobs of it, written straight to the database (no worker
    runs them): ``run-000`` …, every fourth succeeded and the rest cancelled, every tenth tagged ``gold``,
    odd ones by agp."""
    from service.database import make_engine, make_session_factory, session_scope
    from service.repositories import jobs, jobstate, tenants

    engine = make_engine(service.env["NETSURGERY_DATABASE_URL"])
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as s:
            _, key = tenants.create_tenant(s, f"runs-{uuid.uuid4().hex[:8]}")
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            model = upload(c, "/v1/models", _zoo_file(tmp_path / "m.safetensors"), architecture="lenet-300-100")
            dataset = c.post("/v1/datasets", json={"builtin": "digits"}).json()
        with session_scope(factory) as s:
            tenant = tenants.tenant_for_key(s, key)
            assert tenant is not None
            tenant_id = tenant.id
        ids = []
        for i in range(count):
            with session_scope(factory) as s:
                job, _ = jobs.create_job(
                    s, tenant_id, model_id=uuid.UUID(model["id"]), dataset_id=uuid.UUID(dataset["id"]),
                    method="agp" if i % 2 else "dns", target={"compression": 10.0}, settings={"iterations": 100},
                    name=f"run-{i:03d}", tags=["sweep", "gold"] if i % 10 == 0 else ["sweep"],
                )  # fmt: skip
            with session_scope(factory) as s:
                if i % 4 == 0:
                    attempt = jobstate.claim(s, job.id, "test", 60)
                    assert attempt is not None
                    assert jobstate.transition(s, job.id, "running", "succeeded", attempt=attempt, compression=10.0)
                else:
                    assert jobstate.transition(s, job.id, "queued", "cancelled")
            ids.append(job.id)
        return key, ids
    finally:
        engine.dispose()


@needs_browser
def test_dashboard_filters_and_pages_200_jobs_and_names_and_tags_one(
    service: Service, browser: WebDriver, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    key, ids = _finished_jobs(service, tmp_path, 200)
    sign_in_with(browser, service, key)

    def listed() -> tuple[str, str, list[str]]:
        total, at, names = browser.execute_script(
            """return [document.querySelector('#jobs-total').textContent,
                document.querySelector('#page-at').textContent,
                [...document.querySelectorAll('#jobs-table tbody td[data-field=name]')].map(td => td.textContent)];"""
        )
        return total, at, names

    def shows(total: str, at: str, names: list[str]) -> Callable[[WebDriver], bool]:
        return lambda d: listed() == (total, at, names)

    newest = [f"run-{i:03d}" for i in range(199, 149, -1)]
    wait(browser, "the first page", shows("200 in all", "1–50 of 200", newest))
    assert browser.find_element(By.ID, "page-prev").get_attribute("disabled") is not None
    for page in range(1, 4):
        browser.find_element(By.ID, "page-next").click()
        first, last = 200 - 50 * page - 1, 200 - 50 * (page + 1)
        names = [f"run-{i:03d}" for i in range(first, last - 1, -1)]
        wait(browser, f"page {page + 1}", shows("200 in all", f"{50 * page + 1}–{50 * (page + 1)} of 200", names))
    assert browser.find_element(By.ID, "page-next").get_attribute("disabled") is not None
    browser.find_element(By.ID, "page-prev").click()
    wait(browser, "page 3 again", lambda d: listed()[1] == "101–150 of 200")

    # filters: server-side, back to the first page
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("succeeded")
    wait(browser, "the succeeded jobs", lambda d: listed()[:2] == ("50 matching", "1–50 of 50"))
    name = browser.find_element(By.ID, "filter-name")
    name.send_keys("RUN-19")
    wait(browser, "run-19x succeeded", shows("2 matching", "1–2 of 2", ["run-196", "run-192"]))
    name.clear()
    name.send_keys("run-1")  # clear() fires no input event: typing does
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("")
    Select(browser.find_element(By.ID, "filter-method")).select_by_value("dns")
    browser.find_element(By.ID, "filter-tag").send_keys("gold")
    gold = [f"run-{i:03d}" for i in range(190, 99, -10)]
    wait(browser, "the gold dns run-1xx jobs", shows("10 matching", "1–10 of 10", gold))
    cells = browser.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr td[data-field=tags]")
    assert all(c.text.split() == ["sweep", "gold"] for c in cells), [c.text for c in cells]
    browser.find_element(By.ID, "filter-tag").send_keys("x")
    wait(browser, "no match", lambda d: "No jobs match these filters." in d.find_element(By.ID, "jobs-table").text)

    # one job's page: its name and tags, changed from the page
    job_id = str(ids[100])
    browser.get(f"{service.url}/dashboard/#/jobs/{job_id}")
    wait(browser, "the job's name", lambda d: d.find_element(By.ID, "job-name").text == "· run-100")
    assert browser.find_element(By.ID, "job-tags").text.split() == ["sweep", "gold"]
    browser.find_element(By.ID, "edit-labels").click()
    box = browser.find_element(By.ID, "labels-name")
    box.clear()
    box.send_keys("best so far")
    tags = browser.find_element(By.ID, "labels-tags")
    tags.clear()
    tags.send_keys("gold, keep, gold")
    browser.find_element(By.ID, "labels-save").click()
    wait(browser, "the new name", lambda d: d.find_element(By.ID, "job-name").text == "· best so far")
    assert browser.find_element(By.ID, "job-tags").text.split() == ["gold", "keep"]
    assert not browser.find_element(By.ID, "labels-form").is_displayed()
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        stored = c.get(f"/v1/jobs/{job_id}").json()
        assert (stored["name"], stored["tags"]) == ("best so far", ["gold", "keep"])
        assert c.get("/v1/jobs", params={"tag": "keep"}).json()["total"] == 1


@needs_browser
def test_api_docs_render_offline_from_local_files(service: Service, browser: WebDriver, tmp_path: Path) -> None:
    """Swagger UI and ReDoc draw every operation with nothing but the service reachable (https is blocked)."""
    from selenium.webdriver.common.by import By

    with httpx.Client(base_url=service.url, timeout=30) as c:
        spec = c.get("/openapi.json").json()
    operations = [(m, p) for p, ops in spec["paths"].items() for m in ops]
    tags = [t["name"] for t in spec["tags"]]
    assert tags == ["models", "datasets", "jobs", "artifacts", "health"] and all(t["description"] for t in spec["tags"])
    assert {t for ops in spec["paths"].values() for op in ops.values() for t in op["tags"]} == set(tags)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["https://*", "*cdn*", "*fonts.g*"]})

    sign_in(browser, service)
    link = browser.find_element(By.ID, "docs-link")
    href = link.get_attribute("href")
    assert href == service.url + "/docs"
    browser.get(href)
    wait(browser, "every operation", lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == len(operations))
    sections = [e.text.split("\n")[0] for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-tag-section h3")]
    assert sections == tags
    assert "/v1/jobs/{job_id}/logs" in browser.find_element(By.ID, "swagger-ui").text
    assert_local_only(browser, service)
    save_screenshot(browser, "api-docs.png", tmp_path)

    browser.get(service.url + "/redoc")
    wait(browser, "ReDoc's operations", lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-section-id^='tag/']")) > 0
         and len(d.find_elements(By.CSS_SELECTOR, "[data-section-id*='/operation/']")) == len(operations))  # fmt: skip
    assert_local_only(browser, service)
    assert "GET /v1/jobs/{job_id}/logs" in " ".join(browser.find_element(By.TAG_NAME, "redoc").text.split())


def assert_local_only(browser: WebDriver, service: Service) -> None:
    """Everything the page loaded came from the service; a request elsewhere (ReDoc's "powered by" logo,
    refused by the page's Content-Security-Policy) got nothing."""
    entries = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus, e.encodedBodySize])"
    )
    local = [(status, size) for url, status, size in entries if url.startswith(service.url + "/")]
    elsewhere = [(url, status, size) for url, status, size in entries if not url.startswith(service.url + "/")]
    assert local and all(status == 200 and size > 0 for status, size in local), entries
    assert all(status == 0 and size == 0 for _, status, size in elsewhere), elsewhere


@needs_browser
def test_dashboard_compares_jobs_ticked_in_the_list(service: Service, browser: WebDriver, tmp_path: Path) -> None:
    """Two jobs ticked in the list open side by side: one line per job on the compression and accuracy
    charts, one dot per job on accuracy against compression, and a row each with its verdict."""
    from selenium.webdriver.common.by import By

    from tests.e2e.test_service import wait_for_state

    with service.client() as c:
        model = upload(c, "/v1/models", _zoo_file(tmp_path / "m.safetensors"), architecture="lenet-300-100")
        dataset = c.post("/v1/datasets", json={"builtin": "digits"}).json()
        jobs = []
        for target, name in ((4, "compare low"), (12, "compare high")):
            body = {"model_id": model["id"], "dataset_id": dataset["id"], "method": "dns", "name": name,
                    "target": {"compression": target, "max_accuracy_drop": 50},
                    "settings": {"iterations": 400}}  # fmt: skip
            jobs.append(c.post("/v1/jobs", json=body).json())
        done = [wait_for_state(c, job["id"], FINISHED) for job in jobs]
    assert [job["state"] for job in done] == ["succeeded", "succeeded"], done

    sign_in(browser, service)
    for job in jobs:
        selector = f'#jobs-table tr[data-job-id="{job["id"]}"] input[type=checkbox]'

        def row_box(d: WebDriver, selector: str = selector) -> list[Any]:
            return d.find_elements(By.CSS_SELECTOR, selector)

        wait(browser, "the job's row", row_box)[0].click()
    button = browser.find_element(By.ID, "compare-button")
    assert button.text == "Compare 2" and button.is_enabled()
    button.click()
    wait(browser, "the comparison", lambda d: d.find_element(By.ID, "compare-view").is_displayed())
    assert browser.current_url.endswith("#/compare/" + ",".join(job["id"] for job in jobs))

    rows = wait(browser, "both rows", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")) == 2
                and d.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr"))  # fmt: skip
    names = [r.find_element(By.CSS_SELECTOR, "[data-field=name]").text for r in rows]
    assert names == ["compare low", "compare high"]
    for chart in ("#compare-compression", "#compare-accuracy"):

        def two_lines(d: WebDriver, chart: str = chart) -> bool:
            traces = plotted(d, chart)
            return len(traces) == 2 and all(len(t["x"]) > 1 and t["line"] for t in traces)

        wait(browser, f"{chart}'s lines", two_lines)
        assert [t["name"].split(" (")[0] for t in plotted(browser, chart)] == ["compare low", "compare high"]
    scatter = plotted(browser, "#compare-scatter")
    dots = [x for t in scatter for x in t["x"]]
    reached = [job["result"]["compression"] for job in done]
    assert [t["drawn"] for t in scatter] == [1, 1]
    assert sorted(round(x, 3) for x in dots) == sorted(round(x, 3) for x in reached), (dots, reached)
    legend = browser.find_element(By.ID, "compare-legend").text
    assert "compare low" in legend and "compare high" in legend
    save_screenshot(browser, "dashboard-compare.png", tmp_path)


@needs_browser
def test_dashboard_uploads_a_model_and_data_with_a_progress_bar(
    service: Service, browser: WebDriver, tmp_path: Path
) -> None:
    """The page's upload forms: a model (safetensors and its architecture) over a throttled link, whose
    progress bar moves while the bytes go out; the same file again is the model already there; a data
    file and a built-in set; each lands selected in the job form."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    np = pytest.importorskip("numpy")
    import torch

    from dns_core import models as zoo
    from dns_core.io import save_model

    torch.manual_seed(1234)  # weights of its own: the other tests' zoo file is already stored
    weights = tmp_path / "upload-me.safetensors"  # about 1 MB
    save_model(weights, zoo.build("lenet-300-100"), "lenet-300-100")
    np.savez(tmp_path / "blobs.npz", inputs=np.zeros((64, 1, 28, 28), np.float32), targets=np.zeros(64, np.int64))
    sign_in(browser, service)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 400_000},  # bytes/s
    )
    browser.find_element(By.ID, "model-files").send_keys(str(weights))
    browser.find_element(By.ID, "model-arch").send_keys("lenet-300-100")
    browser.find_element(By.ID, "model-name").send_keys("from the page")
    browser.find_element(By.ID, "model-upload").click()
    seen: list[float] = []
    deadline = time.monotonic() + 60
    while not answered(browser, "model-upload-status"):
        bar = browser.find_element(By.ID, "model-progress")
        if bar.is_displayed():
            seen.append(float(bar.get_attribute("value") or 0))
        assert time.monotonic() < deadline, seen[-3:]
        time.sleep(0.05)
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    status = browser.find_element(By.ID, "model-upload-status").text
    assert status.startswith("Added from the page ("), status
    assert any(0 < v < 1 for v in seen) and seen == sorted(seen), seen  # the bar moved forward while uploading
    assert not browser.find_element(By.ID, "model-progress").is_displayed()
    with service.client() as c:
        models = c.get("/v1/models", params={"limit": 1000}).json()["items"]
    model = next(m for m in models if m["name"] == "from the page")
    assert model["architecture"] == "lenet-300-100"
    assert (
        Select(browser.find_element(By.ID, "model-select")).first_selected_option.get_attribute("value") == model["id"]
    )

    # the same bytes again: the model already there, nothing new stored
    browser.find_element(By.ID, "model-files").send_keys(str(weights))
    browser.find_element(By.ID, "model-arch").send_keys("lenet-300-100")
    browser.find_element(By.ID, "model-upload").click()
    again = wait(browser, "the second answer", lambda d: answered(d, "model-upload-status"))
    assert again.startswith("You had uploaded this already:"), again
    with service.client() as c:
        assert c.get("/v1/models", params={"limit": 1000}).json()["total"] == len(models)

    # a refusal says why
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")
    browser.find_element(By.ID, "model-files").send_keys(str(tmp_path / "evil.pt"))
    browser.find_element(By.ID, "model-upload").click()
    refused = wait(browser, "the refusal", lambda d: answered(d, "model-upload-status"))
    assert refused.startswith("Refused:") and "pickle" in refused, refused

    # data: a file, then a built-in set
    browser.find_element(By.ID, "data-file").send_keys(str(tmp_path / "blobs.npz"))
    browser.find_element(By.ID, "data-name").send_keys("blobs")
    browser.find_element(By.ID, "data-upload").click()
    added = wait(browser, "the data", lambda d: answered(d, "data-upload-status"))
    assert added.startswith("Added blobs ("), added
    Select(browser.find_element(By.ID, "data-builtin")).select_by_value("digits")
    browser.find_element(By.ID, "data-upload").click()
    wait(
        browser,
        "the built-in set",
        lambda d: d.find_element(By.ID, "data-upload-status").text.startswith("Added digits"),
    )
    with service.client() as c:
        newest = c.get("/v1/datasets", params={"limit": 1}).json()["items"][0]
    assert newest["builtin_name"] == "digits"
    chosen = Select(browser.find_element(By.ID, "dataset-select")).first_selected_option.get_attribute("value")
    assert chosen == newest["id"]


def answered(driver: WebDriver, status: str) -> str | Literal[False]:
    """An upload form's final answer (added, already there, refused), or False while it is still going."""
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.ID, status).text
    return text if text.startswith(("Added", "You had uploaded", "Refused")) else False
