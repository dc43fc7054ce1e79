"""The explorer in a real browser: the system's headless Chromium, driven by Playwright.

No browser is downloaded: Playwright launches ``chromium`` from the system (Debian's package;
``make test`` installs it when missing and it runs as root). Screenshots of each step are kept
in ``test-artifacts/explorer/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from shared.events import BetPlaced, BetWon, FundsDeposited
from tests.explorer_stack import TOKEN, ExplorerStack, explorer, seed  # noqa: F401
from tests.support import REPO

ARTEFACTS = REPO / "test-artifacts" / "explorer"
AGENT = "browser-agent"
DEADLINE_MS = 15_000


def chromium() -> str | None:
    for candidate in (os.environ.get("PFLEA_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture
async def browser_page() -> AsyncIterator[object]:
    binary = chromium()
    if binary is None:
        pytest.skip(
            "no chromium on this machine: `make test` installs Debian's package when run as root; "
            "otherwise run `sudo apt-get install chromium` (or set PFLEA_CHROMIUM)"
        )
    from playwright.async_api import async_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = await p.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(DEADLINE_MS)
            yield page
        finally:
            await browser.close()


async def test_a_person_logs_in_travels_in_time_asks_what_if_and_sees_live_events(
    explorer: ExplorerStack,  # noqa: F811
    browser_page: object,
) -> None:
    from playwright.async_api import Page, expect

    page = browser_page
    assert isinstance(page, Page)
    await seed(explorer.store, explorer.projector_pool, events=300)
    await explorer.commit(AGENT, FundsDeposited(amount=Decimal("100.50"), asset="PFLEA"))
    await explorer.commit(AGENT, BetPlaced(amount=Decimal("10"), asset="PFLEA", game="dice"))
    await explorer.commit(AGENT, BetWon(amount=Decimal("19.25"), asset="PFLEA", game="dice"))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # The leaderboard, after logging in as the operator.
    await page.goto(f"{explorer.url}/")
    await expect(page).to_have_url(re.compile(r"/login"))
    await page.fill("input[name=secret]", TOKEN)
    await page.click("button[type=submit]")
    await expect(page.locator("h1")).to_contain_text("Leaderboard")
    await expect(page.locator("#live-status")).to_have_text("live")
    await page.screenshot(path=ARTEFACTS / "leaderboard.png", full_page=True)

    # An agent's page: its numbers are the read models'.
    await page.locator(f'section[data-asset="PFLEA"] a:text-is("{AGENT}")').click()
    await expect(page.locator("h1")).to_contain_text(AGENT)
    balances = await explorer.reader_pool.fetch(
        "SELECT asset, balance FROM balances WHERE agent_id = $1", AGENT
    )
    for row in balances:
        cell = page.locator(f'#balances tr[data-asset="{row["asset"]}"] [data-figure="balance"]')
        await expect(cell).to_have_text(str(row["balance"]))
    net = await explorer.reader_pool.fetchval("SELECT net_pnl FROM pnl WHERE agent_id = $1", AGENT)
    await expect(page.locator('tr[data-asset="PFLEA"] [data-figure="net_pnl"]')).to_have_text(str(net))
    await expect(page.locator(".chart polyline")).to_have_count(1)
    await page.locator("details summary").first.click()
    await expect(page.locator("details[open] dd code").first).to_be_visible()
    await page.screenshot(path=ARTEFACTS / "agent.png", full_page=True)

    # Time travel: the slider back to version 1 shows the balance then (the deposit alone).
    await page.click("text=Time travel")
    await page.locator("#version-slider").fill("1")
    await expect(page).to_have_url(re.compile(r"version=1$"))
    then = page.locator('table[data-section="balances"] tr[data-figure="balance"] td.other')
    await expect(then).to_have_text("100.50")
    await expect(page.locator('table[data-section="balances"] td.actual')).to_have_text("109.75")
    await page.screenshot(path=ARTEFACTS / "time-travel.png", full_page=True)

    # What if: switch the win off.
    await page.goto(f"{explorer.url}/agents/{AGENT}")
    await page.locator('tr:has(td:text-is("BetWon")) input[name=without]').check()
    await page.click("text=What if the ticked events had not happened?")
    row = page.locator('table[data-section="balances"] tr[data-figure="balance"]')
    await expect(row.locator("td.other")).to_have_text("90.50")
    await expect(row.locator("td.difference")).to_have_text("-19.25")
    await page.screenshot(path=ARTEFACTS / "what-if.png", full_page=True)

    # Live: an event committed while the agent page is open shows up without a reload.
    await page.goto(f"{explorer.url}/agents/{AGENT}")
    await expect(page.locator("#live-status")).to_have_text("live")
    committed = await explorer.commit(AGENT, FundsDeposited(amount=Decimal("0.25"), asset="PFLEA"))
    await expect(page.locator("#live-status")).to_have_text(f"live · FundsDeposited v{committed.version}")
    await expect(page.locator('#balances tr[data-asset="PFLEA"] [data-figure="balance"]')).to_have_text(
        "110.00"
    )
    await page.screenshot(path=ARTEFACTS / "live.png", full_page=True)
    assert not errors, errors  # no script error, no CSP violation
