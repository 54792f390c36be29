"""Debian's headless Chromium driven by Selenium through Debian's chromedriver (never a download).

`scripts/browser` (run by `make test`) installs both; a test that needs them fails, never skips,
when they are missing. Selenium is synchronous: async tests call it through `asyncio.to_thread`
so the daemon under test keeps running in the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("VB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VB_CHROMEDRIVER", "/usr/bin/chromedriver")
# The flags this machine needs (no sandbox as root, no GPU) and no traffic of Chromium's own.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@contextmanager
def chromium(profile: Path, width: int = 1360, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile in ``profile``; quit on exit."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(
                f"{path} is missing: install chromium and chromium-driver with "
                "`bash scripts/browser` (or run `make test`)",
                pytrace=False,
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(20)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


async def js(driver: webdriver.Chrome, script: str, *args: Any) -> Any:
    """Run ``script`` in the page (off the event loop) and return its value."""
    return await asyncio.to_thread(driver.execute_script, script, *args)


async def until(driver: webdriver.Chrome, script: str, what: str, timeout: float = 20.0) -> Any:
    """Poll ``script`` in the page until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while True:
        try:
            value = await js(driver, script)
        except WebDriverException as exc:
            value = None
            error = str(exc).splitlines()[0]
        else:
            error = ""
        if value:
            return value
        if time.monotonic() > deadline:
            body = await js(driver, "return document.body ? document.body.innerText : ''")
            raise AssertionError(f"page never showed {what} within {timeout}s {error}\n{body}")
        await asyncio.sleep(0.1)
