"""A headless Chromium page driven by Playwright: Debian's ``chromium`` package (installed by
``.ci/run``), never a browser downloaded by ``playwright install``."""

from __future__ import annotations

import contextlib
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextlib.contextmanager
def chromium_page():
    """Yield a Playwright page in headless Chromium; skip when either is missing."""
    sync = pytest.importorskip("playwright.sync_api")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()
