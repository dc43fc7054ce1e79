"""The web explorer's pages, over HTTP, on real Postgres (as the read-only role) and real NATS.

Every figure a page shows is compared with what a user would trust instead: the read models,
``shared.history``'s answers, and the events themselves.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator
from decimal import Decimal

import aiohttp
import pytest

from services.web.auth import COOKIE
from shared import display
from shared.events import BetPlaced, BetWon, FundsDeposited
from shared.history import AsOf, History
from shared.nats_agents import AgentRegistry
from shared.quarantine import Quarantine
from tests.explorer_stack import TOKEN, ExplorerStack, explorer, seed  # noqa: F401

AGENT = "web-agent"


@pytest.fixture
async def stack(explorer: ExplorerStack) -> ExplorerStack:  # noqa: F811
    await seed(explorer.store, explorer.projector_pool)
    await explorer.commit(AGENT, FundsDeposited(amount=Decimal("100.50"), asset="PFLEA"))
    await explorer.commit(AGENT, BetPlaced(amount=Decimal("10"), asset="PFLEA", game="dice"))
    await explorer.commit(AGENT, BetWon(amount=Decimal("19.25"), asset="PFLEA", game="dice"))
    return explorer


async def session(stack: ExplorerStack, agent: str = "", secret: str = TOKEN) -> aiohttp.ClientSession:
    """A browser-like session, logged in (operator by default)."""
    client = aiohttp.ClientSession(stack.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with client.post("/login", data={"agent": agent, "secret": secret}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
    return client


@pytest.fixture
async def operator(stack: ExplorerStack) -> AsyncIterator[aiohttp.ClientSession]:
    client = await session(stack)
    yield client
    await client.close()


async def page(client: aiohttp.ClientSession, path: str, status: int = 200) -> str:
    async with client.get(path, allow_redirects=False) as r:
        text = await r.text()
        assert r.status == status, f"{path}: {r.status} {text[:300]}"
        return text


def cells(text: str, figure: str) -> dict[str, str]:
    """asset -> the text of the cell ``data-figure=figure`` in each ``data-asset`` row."""
    found = {}
    for row in re.finditer(r'<tr data-asset="([^"]+)">(.*?)</tr>', text, re.S):
        cell = re.search(rf'data-figure="{figure}">(?:<a [^>]*>)?([^<]*)<', row.group(2))
        if cell:
            found[html.unescape(row.group(1))] = cell.group(1).strip()
    return found


async def test_every_page_but_the_login_asks_for_one_and_every_answer_carries_a_strict_csp(
    stack: ExplorerStack,
) -> None:
    async with aiohttp.ClientSession(stack.url) as anonymous:
        for path in ("/", f"/agents/{AGENT}", f"/agents/{AGENT}/what-if", "/operations"):
            async with anonymous.get(path, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"].startswith("/login")
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with anonymous.get("/login") as r:
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "unsafe-inline" not in csp
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "<script>" not in await r.text()  # no inline script anywhere
        async with anonymous.post("/login", data={"secret": "wrong"}) as r:
            assert r.status == 401
        for elsewhere in ("//evil.example/", "/\\evil.example/", "https://evil.example/"):
            form = {"secret": TOKEN, "next": elsewhere}
            async with anonymous.post("/login", data=form, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/"  # never off this site
        async with anonymous.post(
            "/login", data={"secret": TOKEN}, headers={"Origin": "https://evil.example"}
        ) as r:
            assert r.status == 403  # a cross-site form post is refused


async def test_the_agent_page_shows_the_read_models_figures(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    text = await page(operator, f"/agents/{AGENT}")
    assert cells(text, "balance") == {"PFLEA": "109.75"}
    portfolio = await stack.reader_pool.fetchrow(
        "SELECT available, in_escrow FROM portfolio WHERE agent_id = $1 AND asset = 'PFLEA'", AGENT
    )
    assert cells(text, "available") == {"PFLEA": str(portfolio["available"])}
    pnl = await stack.reader_pool.fetchrow(
        "SELECT net_pnl, win_rate, roi FROM pnl WHERE agent_id = $1", AGENT
    )
    assert cells(text, "net_pnl") == {"PFLEA": str(pnl["net_pnl"])} == {"PFLEA": "9.25"}
    for ratio in ("win_rate", "roi"):  # a percentage to read, the exact ratio on hover
        assert cells(text, ratio) == {"PFLEA": display.percent(pnl[ratio])}
        assert f'title="{pnl[ratio]}" data-figure="{ratio}"' in text
    assert "<svg" in text and "<polyline" in text  # the chart, drawn on the server
    assert text.count('name="without"') == 3  # the timeline, each event switchable for a what-if


async def test_every_agent_of_a_generated_history_shows_its_read_model_balances(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    rows = await stack.reader_pool.fetch("SELECT agent_id, asset, balance FROM balances ORDER BY 1, 2")
    expected: dict[str, dict[str, str]] = {}
    for r in rows:
        expected.setdefault(r["agent_id"], {})[r["asset"]] = str(r["balance"])
    assert len(expected) > 2
    for agent_id, balances in expected.items():
        assert cells(await page(operator, f"/agents/{agent_id}"), "balance") == balances


async def test_the_leaderboard_lists_the_read_models_ranking(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    text = await page(operator, "/")
    ranked = await stack.reader_pool.fetch(
        "SELECT asset, agent_id, net_pnl FROM leaderboard ORDER BY asset, rank, agent_id"
    )
    for asset in {r["asset"] for r in ranked}:
        section = re.search(rf'<section class="board" data-asset="{asset}">(.*?)</section>', text, re.S)
        assert section is not None
        shown = re.findall(r'<tr data-agent="([^"]+)">', section.group(1))
        assert shown == [r["agent_id"] for r in ranked if r["asset"] == asset][: len(shown)]


async def test_explaining_a_figure_lists_the_events_whose_parts_make_it(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    text = await page(operator, f"/agents/{AGENT}/explain?asset=PFLEA&figure=balance")
    assert re.search(r'id="explained-total">109.75<', text)
    assert re.findall(r'class="num part">([^<]+)<', text) == ["19.25", "-10", "100.50"]
    assert re.findall(r'class="num running">([^<]+)<', text) == ["109.75", "90.50", "100.50"]
    text = await page(operator, f"/agents/{AGENT}/explain?asset=PFLEA&figure=net_pnl")
    assert re.findall(r'class="num part">([^<]+)<', text) == ["19.25", "-10"]
    # Every balance of a generated history: the parts add up to the read model's figure.
    for agent_id, asset, balance in await stack.reader_pool.fetch(
        "SELECT agent_id, asset, balance FROM balances"
    ):
        text = await page(operator, f"/agents/{agent_id}/explain?asset={asset}&figure=balance")
        total = re.search(r'id="explained-total">([^<]+)<', text)
        assert total is not None and Decimal(total.group(1)) == balance
        parts = [Decimal(p) for p in re.findall(r'class="num part">([^<]+)<', text)]
        running = [Decimal(r) for r in re.findall(r'class="num running">([^<]+)<', text)]
        assert "Older events" not in text and sum(parts) == balance
        assert running[0] == balance if running else balance == 0
    await page(operator, f"/agents/{AGENT}/explain?asset=PFLEA&figure=bogus", status=400)


async def test_time_travel_shows_the_state_history_computes_for_that_version(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    text = await page(operator, f"/agents/{AGENT}/history?version=1")
    row = re.search(r'data-asset="PFLEA" data-figure="balance".*?class="num other">([^<]+)<', text, re.S)
    assert row is not None and row.group(1) == "100.50"
    agent_id = await stack.reader_pool.fetchval("SELECT agent_id FROM balances WHERE agent_id <> $1", AGENT)
    view = await History(stack.reader_pool).state(agent_id, AsOf(version=40))
    text = await page(operator, f"/agents/{agent_id}/history?version=40")
    for asset, value in view.state.balances().items():
        shown = re.search(
            rf'data-asset="{asset}" data-figure="balance".*?class="num other">([^<]+)<', text, re.S
        )
        assert shown is not None and Decimal(shown.group(1)) == value
    await page(operator, f"/agents/{AGENT}/history?version=99", status=400)
    await page(operator, f"/agents/{AGENT}/history?at=yesterday", status=400)


async def test_what_if_an_event_had_not_happened_shows_the_difference_and_writes_nothing(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    won = await stack.reader_pool.fetchval(
        "SELECT event_id FROM events WHERE stream_id = $1 AND event_type = 'BetWon'", AGENT
    )
    count = await stack.reader_pool.fetchval("SELECT count(*) FROM events")
    text = await page(operator, f"/agents/{AGENT}/what-if?without={won}")
    row = re.search(r'class="changed">\s*<td>PFLEA</td><td>balance</td>(.*?)</tr>', text, re.S)
    assert row is not None
    assert re.findall(r'class="num [a-z]+">([^<]*)<', row.group(1)) == ["109.75", "90.50", "-19.25"]
    rate = re.search(r'data-figure="win_rate" class="changed">(.*?)</tr>', text, re.S)
    assert rate is not None, "a win switched off changes the win rate"
    shown = re.findall(r'class="num [a-z]+">([^<]*)<', rate.group(1))
    assert len(shown) == 3 and all(re.fullmatch(r"-?\d+\.\d\d %", c) for c in shown), shown
    added = json.dumps({"amount": "5", "asset": "PFLEA"})
    text = await page(operator, f"/agents/{AGENT}/what-if?add_type=FundsDeposited&add_data={added}")
    change = re.search(r'<td>PFLEA</td><td>balance</td>.*?class="num difference">([^<]+)<', text, re.S)
    assert change is not None and Decimal(change.group(1)) == 5
    await page(operator, f"/agents/{AGENT}/what-if?without=not-a-uuid", status=400)
    assert await stack.reader_pool.fetchval("SELECT count(*) FROM events") == count


async def test_an_agent_sees_only_its_own_pages_until_its_credentials_are_removed(
    stack: ExplorerStack,
) -> None:
    password = stack.add_agent(AGENT)
    async with (
        aiohttp.ClientSession(stack.url) as anonymous,
        anonymous.post("/login", data={"agent": AGENT, "secret": "guess"}) as r,
    ):
        assert r.status == 401
    client = await session(stack, AGENT, password)
    try:
        other = await stack.reader_pool.fetchval("SELECT agent_id FROM balances WHERE agent_id <> $1", AGENT)
        await page(client, f"/agents/{AGENT}")
        await page(client, f"/agents/{AGENT}/what-if")
        for path in (
            f"/agents/{other}",
            f"/agents/{other}/history?version=1",
            "/operations",
            f"/live/{other}",
        ):
            await page(client, path, status=403)
        board = await page(client, "/")
        assert set(re.findall(r'<tr data-agent="([^"]+)">', board)) == {AGENT}
        AgentRegistry(stack.data_dir, stack.topology.namespace).remove(AGENT)
        await page(client, f"/agents/{AGENT}", status=303)  # revoked: back to the login
    finally:
        await client.close()


async def test_a_forged_or_tampered_session_cookie_is_refused(stack: ExplorerStack) -> None:
    client = await session(stack)
    try:
        cookie = next(c for c in client.cookie_jar if c.key == COOKIE).value
        payload, _, signature = cookie.rpartition(".")
        forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
        for value in (f"{forged}.{signature}", f"{payload}.x{signature[1:]}", "garbage"):
            async with aiohttp.ClientSession(stack.url, cookies={COOKIE: value}) as c:
                await page(c, "/", status=303)
    finally:
        await client.close()


async def test_text_from_a_feed_and_quarantined_bytes_are_shown_escaped(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    attack = '<script>alert("x")</script>'
    await stack.commit(AGENT, BetPlaced(amount=Decimal("1"), asset="PFLEA", game=attack))
    await Quarantine(stack.projector_pool, "projector:balance").put(
        b'{"game": "<img src=x onerror=alert(1)>"}\xff\xfe', "not JSON", agent_id=AGENT
    )
    agent_page = await page(operator, f"/agents/{AGENT}")
    operations = await page(operator, "/operations")
    for text in (agent_page, operations):
        assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert" in agent_page
    assert "&lt;img src=x onerror=alert(1)&gt;" in operations and "\\xff\\xfe" in operations
    assert re.search(r'<tr><td>projector:balance</td>|id="projections"', operations)


async def test_live_events_of_an_agent_arrive_as_server_sent_events(
    stack: ExplorerStack, operator: aiohttp.ClientSession
) -> None:
    async with operator.get(f"/live/{AGENT}", headers={"Accept": "text/event-stream"}) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert (await stream.content.readline()).startswith(b": subscribed")
        committed = await stack.commit(AGENT, FundsDeposited(amount=Decimal("1"), asset="PFLEA"))
        await stack.commit("someone-else", FundsDeposited(amount=Decimal("1"), asset="PFLEA"))

        async def next_event() -> dict[str, object]:
            while True:
                line = await stream.content.readline()
                if line.startswith(b"data: "):
                    result: dict[str, object] = json.loads(line[6:])
                    return result

        event = await asyncio.wait_for(next_event(), 10)
    assert event == {
        "agent_id": AGENT,
        "version": committed.version,
        "event_type": "FundsDeposited",
        "event_id": str(committed.event_id),
    }


async def test_an_unknown_agent_is_a_clear_not_found(operator: aiohttp.ClientSession) -> None:
    text = await page(operator, "/agents/nobody-here", status=404)
    assert "has no events" in text
