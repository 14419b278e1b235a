"""`florql ui` in a real browser: Debian's chromium, headless, driven by Playwright.

Screenshots of each step are kept in tmp/artifacts/ at the repository root.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

import florql
from florql.ui.server import BackgroundUI
from store_support import Store
from ui_support import ARTIFACTS, logged_grad_norm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs it: apt-get install chromium)"
)
# The network is closed: no background requests, no first-run work, a fresh profile.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 300_000  # a safety net for a hung page or replay, not a timing assertion


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # bypass_csp: Playwright evaluates wait_for_function predicates with eval, which the page's CSP forbids.
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", state="attached")


def points(page: Any, chart: str) -> list[float]:
    """The points a chart holds, read from uPlot's own data (series 1)."""
    return page.evaluate(f"window.florqlCharts[{chart!r}].data[1].filter((v) => v !== null)")


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def test_runs_page_run_charts_and_a_hindsight_chart_from_the_query_box(page: Any, ui: BackgroundUI, recorded) -> None:
    open_page(page, ui.url + "/")
    assert page.locator("#runs tbody tr").count() == 2
    assert page.locator("#runs tbody tr[data-run='1']").inner_text().count("lr=0.1") == 1
    shoot(page, "1-runs")

    page.click("a[href='/runs/1']")
    page.wait_for_selector("body[data-ready='1']", state="attached")
    assert page.url.endswith("/runs/1")
    assert len(points(page, "loss")) == 12  # 3 epochs of 4 steps, every logged point drawn
    assert page.evaluate("window.florqlCharts.loss.series[1].label") == "loss"
    assert page.locator(".tag.loggable").count() == 1
    shoot(page, "2-run")

    page.click("button.hindsight[data-name='grad_norm']")  # fills the box with the query and explains it
    page.wait_for_selector("#confirm-replay")
    assert "grad_norm" in page.inner_text("#plan-text") and "re-execute" in page.inner_text("#plan-text")
    shoot(page, "3-plan")
    page.click("#confirm-replay")
    page.wait_for_function("window.florqlCharts.answer !== undefined")
    assert points(page, "answer") == logged_grad_norm(recorded.home, run_id=2)  # bit for bit
    assert page.evaluate("window.florqlCharts.answer.series[1].label") == "grad_norm (replayed)"
    assert "replayed 1 job(s)" in page.inner_text("#progress")
    shoot(page, "4-hindsight-answer")

    page.reload()
    page.wait_for_selector("body[data-ready='1']", state="attached")
    assert len(points(page, "grad_norm")) == 12
    assert page.evaluate("window.florqlCharts.grad_norm.series[1].label") == "grad_norm (replayed)"
    shoot(page, "5-run-after-hindsight")


def test_compare_runs_on_one_chart(page: Any, ui: BackgroundUI) -> None:
    open_page(page, ui.url + "/")
    page.check("input.compare[value='1']")
    page.check("input.compare[value='2']")
    page.select_option("#compare-name", "loss")
    page.click("#compare")
    page.wait_for_function("window.florqlCharts.compare !== undefined")
    labels = page.evaluate("window.florqlCharts.compare.series.slice(1).map((s) => s.label)")
    assert labels == ["run 1 (lr=0.1)", "run 2 (lr=0.1)"]
    shoot(page, "6-compare")


def test_bad_sql_and_unknown_run_are_messages_on_the_page(page: Any, ui: BackgroundUI) -> None:
    open_page(page, ui.url + "/runs/1")
    page.fill("#sql", "SELEC epoch FROM run_1")
    page.click("#run")
    page.wait_for_selector("#query-error:not(:empty)")
    assert "syntax error" in page.inner_text("#query-error") and "42601" in page.inner_text("#query-error")
    page.fill("#sql", "DROP TABLE runs")
    page.click("#run")
    page.wait_for_function("document.querySelector('#query-error').textContent.includes('read-only')")
    shoot(page, "7-bad-sql")

    response = page.goto(ui.url + "/runs/99")
    assert response.status == 404
    assert "there is no run 99" in page.inner_text("#message")
    shoot(page, "8-unknown-run")


# Logs epoch 0, then waits for the test's go-ahead file before epoch 1: the run is `running` meanwhile.
WAITING_TRAINER = """
import os, time
import florql
for epoch in florql.loop("epoch", range(2)):
    florql.log("acc", 0.5 + epoch)
    while epoch == 0 and not os.path.exists("go"):
        time.sleep(0.05)
"""


def test_a_running_runs_chart_grows_live(page: Any, store: Store) -> None:
    trainer = store.popen(store.write_script(WAITING_TRAINER))
    try:
        db = florql.connect(store.home)
        deadline = time.monotonic() + WAIT_MS / 1000  # a safety net, not a timing assertion
        while db.sql("SELECT status FROM runs WHERE run_id = 1").fetchall() != [("running",)]:
            assert time.monotonic() < deadline and trainer.poll() is None, "the trainer did not start"
            time.sleep(0.1)
        with BackgroundUI(str(store.home)) as ui:
            open_page(page, ui.url + "/runs/1")
            acc = "window.florqlCharts.acc && window.florqlCharts.acc.data[1].filter((v) => v !== null).length"
            page.wait_for_function(f"({acc}) === 1")
            assert "running" in page.inner_text("h2")
            shoot(page, "9-live-running")
            (store.workdir / "go").touch()
            page.wait_for_function(f"({acc}) === 2")  # drawn by the page's own refresh, no reload
            assert points(page, "acc") == [0.5, 1.5]
        assert trainer.wait(timeout=120) == 0
    finally:
        trainer.kill()
        trainer.communicate()
