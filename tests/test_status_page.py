"""The status page in a real browser: Debian's chromium driven by Playwright, replaying from the DLQ.

The browser is /usr/bin/chromium (``make chromium`` installs it when missing); Playwright's own browser
downloads are never used."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright
from playwright.async_api import expect as pw_expect

from integrand.config import load_config

from .helpers import admin_url, hook_url, post_signed, running, wait_for, write_config
from .receiver import Receiver

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str:
    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium")
    return str(CHROMIUM)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    path = chromium()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


def config(receiver: Receiver) -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[sinks.crm]
connector = "http"
url = "{receiver.url}"

[[routes]]
from = "demo"
to = ["crm"]
"""


async def dead_ids(d: Any) -> dict[str, int]:
    return {x.event_id: x.id for x in await d.store.dead_letters()}


async def dlq_rows(page: Page) -> list[str]:
    """The event ids the page's DLQ table lists now."""
    return [t.strip() for t in await page.locator("#dlq-table tbody tr td:nth-child(3)").all_inner_texts()]


async def test_replay_from_the_status_page_reaches_the_sink(tmp_path: Path, browser: Browser) -> None:
    receiver = Receiver(per_event={f"e{i}": [(400, {})] for i in range(1, 5)})
    await receiver.start()
    cfg = write_config(tmp_path, config(receiver))
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            for i in (1, 2, 3):
                assert (await post_signed(s, hook_url(d), {"type": "customer.updated", "n": i}, f"e{i}"))[0] == 200
            async with s.post(hook_url(d), data=b"{}", headers={"Content-Type": "application/json"}) as r:
                assert r.status == 401  # a refused webhook for the page to show
            await wait_for(lambda: _count(d, 3), timeout=10)
            ids = await dead_ids(d)

            context = await browser.new_context(timezone_id="Asia/Kolkata", locale="en-GB")
            page = await context.new_page()
            await page.goto(admin_url(d, "/"))
            await pw_expect(page.locator("h2", has_text="Dead-letter queue (3)")).to_be_visible()
            assert sorted(await dlq_rows(page)) == ["e1", "e2", "e3"]
            # Queue depths, sinks with their health, refused webhooks with their redacted headers.
            assert "crm" in await page.locator("#queue-table").inner_text()
            assert "ok" in await page.locator("#sink-table").inner_text()
            refused = await page.locator("#refused-table").inner_text()
            assert "401" in refused and "demo" in refused
            # Times in the browser's zone: the script rewrote the UTC text, keeping UTC in the title.
            t = page.locator("#dlq-table time").first
            iso = await t.get_attribute("datetime")
            assert iso is not None and iso.endswith("Z")
            await pw_expect(t).not_to_have_text(iso)
            assert await t.get_attribute("title") == iso

            # One replay button: the entry leaves the DLQ and the sink (now accepting it) gets it.
            await page.click(f'button.replay[data-id="{ids["e1"]}"]')
            await pw_expect(page.locator("#result")).to_have_text("replayed 1")
            await wait_for(lambda: _delivered(receiver, "e1"), timeout=10)
            await wait_for(lambda: _rows_are(page, ["e2", "e3"]), timeout=15)

            # Bulk: the checked one, then all the rest.
            await page.check(f'input.pick[value="{ids["e2"]}"]')
            await page.click("#replay-selected")
            await wait_for(lambda: _delivered(receiver, "e2"), timeout=10)
            await wait_for(lambda: _rows_are(page, ["e3"]), timeout=15)
            await page.click("#replay-all")
            await wait_for(lambda: _delivered(receiver, "e3"), timeout=10)
            await pw_expect(page.locator("#dlq-table-empty")).to_be_visible(timeout=15000)
            assert await _count(d, 0)

            # Auto-refresh: a new dead letter appears without reloading the page.
            assert (await post_signed(s, hook_url(d), {"type": "x"}, "e4"))[0] == 200
            await wait_for(lambda: _rows_are(page, ["e4"]), timeout=20)

            # Search by the provider's id: the event's story, ending in "delivered".
            await page.fill("input[name=q]", "e1")
            await page.click("#search button")
            story = await page.locator("#story").inner_text()
            for step in ("received", "routed", "dead", "replayed", "delivered"):
                assert step in story, step
            await page.fill("input[name=q]", "nothing-like-this")
            await page.click("#search button")
            await pw_expect(page.locator("#story")).to_contain_text("no event nothing-like-this")
            await context.close()
    finally:
        await receiver.stop()


async def _count(d: Any, n: int) -> bool:
    return len(await d.store.dead_letters()) == n


def _delivered(receiver: Receiver, event_id: str) -> bool:
    return any(e["id"] == event_id for e in receiver.delivered())


async def _rows_are(page: Page, expected: list[str]) -> bool:
    return sorted(await dlq_rows(page)) == expected
