"""The web page in a real browser: headless Chromium (Debian's, scripts/browser.sh) driven by Playwright
against `lorp serve`. Submit a job through the form, watch it finish, open its page, screenshot it, and
find the heat map drawn and the download links there; where keys are required the page asks for one
and keeps it in the tab's session storage only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .stack import embedded_stack

LORP = str(Path(sys.executable).with_name("lorp"))
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup installs it")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (scripts/browser.sh installs Debian's chromium)"
)
SCREENSHOTS = Path(os.environ.get("LORP_SCREENSHOTS", "var/screenshots"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "web") as stack:
        yield stack


def test_submit_through_the_form_and_read_the_job_page(browser: Any, embedded: dict[str, Any]) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{embedded['base']}/")
    page.fill("#model", embedded["model"])
    page.fill("#num_layers", "1")
    # The form offers what the service lists (the engine's registry), with the default selected.
    page.wait_for_selector("#method[data-ready=true]", timeout=30_000)
    offered = page.eval_on_selector_all("#method option", "options => options.map(o => [o.value, o.selected])")
    listed = page.request.get(f"{embedded['base']}/v1/methods").json()
    assert offered == [[m["name"], m["name"] == listed["default"]] for m in listed["methods"]]
    page.select_option("#method", "lorp")
    page.fill("#num_samples", "4")
    page.fill("#seq_len", "32")
    page.select_option("#heal", "none")
    page.click("#submit-button")
    page.wait_for_url("**/jobs/*", timeout=30_000)
    job_id = page.url.rstrip("/").split("/")[-1]
    page.wait_for_selector("body[data-ready=true]", timeout=240_000)

    assert page.text_content("#status") == "succeeded"
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 100  # the PNG was drawn
    assert page.evaluate("document.getElementById('plans-chart').naturalWidth") > 100
    links = page.eval_on_selector_all("#artifacts a", "links => links.map(a => [a.textContent, a.href])")
    names = {name for name, _ in links}
    assert {"model/config.json", "model/model.safetensors", "report.json", "heatmap.png"} <= names
    assert all(href.startswith(f"{embedded['base']}/v1/jobs/{job_id}/artifacts/") for _, href in links)
    assert page.locator("#plans tr.chosen").count() == 1
    assert page.locator("#metrics tbody tr").count() >= 3
    assert page.locator("#generations pre").count() >= 2  # dense and pruned completions
    assert "blocks [" in (page.text_content("[data-fact=chosen]") or "")
    assert (page.text_content("[data-fact=execution]") or "").startswith("resident on cpu")
    assert page.text_content("[data-fact=heal]") == "none (options.heal is none)"  # the form's choice, sent
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "job-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

    # A download link serves the file itself.
    config = page.request.get(dict(links)["model/config.json"])
    assert config.ok and config.json()["num_hidden_layers"] == 3
    # The list shows the job, refreshed by the script.
    page.goto(f"{embedded['base']}/")
    page.wait_for_selector(f"#jobs tr[data-job='{job_id}'][data-status=succeeded]", timeout=10_000)
    assert not errors, errors


def test_the_page_asks_for_a_key_where_keys_are_required(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> None:
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "web-keys", LORP_AUTH_REQUIRED="true") as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
        env["LORP_DATA_DIR"] = str(stack["data"])
        created = subprocess.run(
            [LORP, "keys", "create", "--name", "browser"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        key = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("key "))
        page = browser.new_page()
        page.goto(f"{stack['base']}/")
        page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
        assert "API key is required" in (page.text_content("#error") or "")
        # A refresh sent before the key was typed in, answered 401 after, leaves the new key alone
        # (the jobs list refreshes every 2 s, so this race is there for a user too).
        kept = page.evaluate(
            """async (key) => {
                const late = api("/v1/jobs?limit=1").catch(() => null);
                sessionStorage.setItem("lorp_api_key", key);
                await late;
                const kept = sessionStorage.getItem("lorp_api_key");
                sessionStorage.removeItem("lorp_api_key");
                return kept;
            }""",
            key,
        )
        assert kept == key
        page.fill("#key", key)
        with page.expect_navigation():
            page.click("#key-form button")
        page.wait_for_selector("#key-form[hidden]", state="attached", timeout=10_000)
        page.wait_for_function("document.getElementById('error').hidden", timeout=10_000)
        assert page.evaluate("sessionStorage.getItem('lorp_api_key')") == key
        assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []  # the tab only
        # Another tab does not have it.
        other = page.context.browser.new_page()
        other.goto(f"{stack['base']}/")
        other.wait_for_selector("#key-form:not([hidden])", timeout=10_000)


def test_a_failed_job_s_page_says_whether_submitting_it_again_may_succeed(
    browser: Any, embedded: dict[str, Any]
) -> None:
    from app.core.config import Settings
    from app.db.models import Job, JobStatus
    from app.db.session import session_factory, session_scope

    settings = Settings(data_dir=embedded["data"])
    ids = {}
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        for code in ("worker_lost", "invalid_budget"):
            job = Job(
                request={"model": {"id": "demo"}, "target": {"num_layers": 2}}, request_hash="0" * 64,
                model_source="demo", method="lorp", queue=settings.queue_name, status=JobStatus.failed,
                error_code=code, error_message=f"the {code} story",
            )  # fmt: skip
            session.add(job)
            session.flush()
            ids[code] = job.id
    page = browser.new_page()
    shown = {}
    for code, job_id in ids.items():
        page.goto(f"{embedded['base']}/jobs/{job_id}")
        page.wait_for_selector("#failure:not([hidden])", timeout=10_000)
        shown[code] = page.text_content("#failure") or ""
    assert shown["worker_lost"].startswith("worker_lost: the worker_lost story")
    assert "submitting it again may succeed" in shown["worker_lost"]
    assert shown["invalid_budget"] == "invalid_budget: the invalid_budget story"
