"""Drive the Prefect UI in Debian's headless Chromium with Playwright.

Playwright's own browser download does not work here (no internet), so the
system browser is launched by path. The flags keep Chromium from calling
Google's services, which this machine's closed network refuses.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("GEAR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def browser_skip_mark():
    """A skip mark for the browser tests when Playwright or Chromium is missing
    (None when both are here). CI sets GEAR_REQUIRE_BROWSER=1, so a missing
    browser fails there instead of skipping."""
    import pytest

    try:
        import playwright.sync_api  # noqa: F401

        missing = None if chromium_path() else "no Chromium (apt-get install -y chromium)"
    except ImportError:
        missing = "no playwright (pip install -e '.[browser]')"
    if missing and os.environ.get("GEAR_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"GEAR_REQUIRE_BROWSER=1 but {missing}")
    return pytest.mark.skip(reason=missing) if missing else None


@contextmanager
def chromium_page(out_dir: Path, viewport=(1400, 1000)) -> Iterator["Page"]:  # noqa: F821
    """A fresh page in headless Chromium; a screenshot lands in out_dir if the body raises."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    assert exe, "no Chromium: apt-get install -y chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            page = context.new_page()
            page.set_default_timeout(60_000)
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            try:
                yield page
            except BaseException:
                shot = out_dir / "failure.png"
                try:
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"screenshot: {shot} (page {page.url})")
                except Exception as exc:  # the page may be gone
                    print(f"no screenshot: {exc}")
                (out_dir / "console.log").write_text("\n".join(console))
                raise
        finally:
            browser.close()


def form_field(page, label: str):
    """The input of the innermost schema-form property whose label starts with `label`."""
    prop = page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(rf"^\s*{re.escape(label)}", re.I))
    )
    return prop.last.locator("input, textarea").first


def start_custom_run(page, ui_url: str, deployment: str, flow: str, run_name: str, changes: dict[str, str],
                     before_submit=None) -> str:
    """Deployments > `deployment` of `flow` > Run > Custom run; name the run, edit fields, submit.

    Then open the new run's page from the deployment's run list and return its id.
    """
    page.goto(f"{ui_url}/deployments", wait_until="domcontentloaded")
    page.get_by_placeholder(re.compile("Search deployments", re.I)).fill(deployment)
    row = page.get_by_role("row").filter(has_text=flow).filter(has=page.get_by_role("link", name=deployment, exact=True))
    row.get_by_role("link", name=deployment, exact=True).first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}"))
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}/run"))
    name_input = page.locator(".p-label", has_text="Run Name").locator("input").first
    name_input.fill(run_name)
    for label, value in changes.items():
        field = form_field(page, label)
        field.scroll_into_view_if_needed()
        field.fill(str(value))
        field.blur()
    if before_submit is not None:
        before_submit(page)
    page.get_by_role("button", name="Submit").click()
    # The UI goes back to the deployment page, whose run list shows the new run.
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}(\?|$)"))
    page.get_by_role("link", name=run_name, exact=True).first.click()
    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def wait_for_final_state(page, timeout_s: float) -> str:
    """On a flow run page: wait until the heading's state badge shows a final state; return it.

    Scoped to the run's heading: while Vue swaps pages, badges of the previous
    page (other runs) can still be in the DOM.
    """
    pattern = re.compile(r"^\s*(Completed|Failed|Crashed|Cancelled)\s*$")
    badge = page.locator(".page-heading-flow-run .state-badge", has_text=pattern).first
    badge.wait_for(timeout=timeout_s * 1000)
    return badge.inner_text().strip()


def run_parameters_text(page) -> str:
    """On a flow run page: open the Parameters tab and return the JSON it shows."""
    page.get_by_text("Parameters", exact=True).first.click()
    panel = page.locator("[role=tabpanel]").filter(has_text="{").last
    panel.wait_for()
    return panel.inner_text()
