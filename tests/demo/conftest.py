"""The demo app launched once on 127.0.0.1 (a free port) for the whole test session, and a client to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


@pytest.fixture(scope="session")
def app_url() -> Iterator[str]:
    from mmattn.demo import launch

    app = launch("127.0.0.1", 0, block=False)
    yield app.local_url
    app.close()


@pytest.fixture(scope="session")
def client(app_url: str):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (skips where the chromium package is missing)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("needs the chromium package (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url: str):
    page = browser.new_page()
    page.goto(app_url)
    page.wait_for_selector("#vision-run", timeout=60_000)
    yield page
    page.close()
