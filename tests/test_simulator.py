"""The Purple Flea simulator: a deterministic feed, honest ground truth, and faults on demand."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from devstack.processes import wait_until
from services.simulator import (
    MALFORMED_KINDS,
    FaultKnobs,
    SimulatorConfig,
    load_simulator_config,
    running_simulator,
)
from services.simulator.epoch import EPOCH_FILE, feed_epoch, kept_epoch
from services.simulator.feed import FEEDS
from shared.money import parse_amount
from shared.settings import SettingsError
from tests.support import REPO

Tx = dict[str, Any]


def sim_config(**overrides: Any) -> SimulatorConfig:
    """A small static feed on a free port unless a test says otherwise."""
    values: dict[str, Any] = {"port": 0, "seed": 7, "agents": 3, "backlog": 40, "rate": 0.0}
    return SimulatorConfig(**{**values, **overrides})


@asynccontextmanager
async def simulator(config: SimulatorConfig) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running_simulator(config) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield client


def bearer(agent_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{agent_id}"}


async def get_page(
    client: httpx.AsyncClient,
    agent_id: str,
    since: str | None = None,
    limit: int | None = None,
    feed: str = "casino",
) -> httpx.Response:
    params: dict[str, str | int] = {"agent_id": agent_id}
    if since is not None:
        params["since"] = since
    if limit is not None:
        params["limit"] = limit
    path = "/transactions" if feed == "casino" else f"/{feed}/transactions"
    return await client.get(path, params=params, headers=bearer(agent_id))


def items(response: httpx.Response) -> list[Tx]:
    assert response.status_code == 200, response.text
    # parse_float=Decimal: amounts sent as JSON numbers are read exactly, never as floats.
    return list(json.loads(response.content, parse_float=Decimal)["transactions"])


async def truth(client: httpx.AsyncClient, agent_id: str | None = None, feed: str | None = None) -> list[Tx]:
    """Every transaction generated so far (of one agent, of one feed), as they happened."""
    params = {"agent_id": agent_id} if agent_id else {}
    response = await client.get("/admin/truth", params=params)
    assert response.status_code == 200
    return [tx for tx in response.json()["transactions"] if feed is None or tx["feed"] == feed]


async def set_faults(client: httpx.AsyncClient, **knobs: Any) -> None:
    response = await client.post("/admin/faults", json=knobs)
    assert response.status_code == 200, response.text


# --- determinism ----------------------------------------------------------------------------


async def test_two_simulators_with_the_same_seed_serve_identical_feeds() -> None:
    config = sim_config(faults=FaultKnobs(malformed_rate=0.1), numeric_amount_rate=0.3)
    async with simulator(config) as first, simulator(config) as second:
        for agent_id in ("agent-0001", "agent-0002", "agent-0003"):
            one = await get_page(first, agent_id, limit=1000)
            two = await get_page(second, agent_id, limit=1000)
            assert one.content == two.content
        assert await truth(first) == await truth(second)


async def test_another_seed_serves_another_feed() -> None:
    async with simulator(sim_config(seed=7)) as first, simulator(sim_config(seed=8)) as second:
        one = [tx["raw"] for tx in await truth(first, "agent-0001")]
        two = [tx["raw"] for tx in await truth(second, "agent-0001")]
    assert one != two


async def test_feed_content_does_not_depend_on_how_fast_it_grows() -> None:
    static = sim_config(backlog=30)
    live = sim_config(backlog=2, rate=5000.0, max_per_agent=30)
    async with simulator(static) as ground, simulator(live) as growing:

        async def all_generated() -> bool:
            stats = (await growing.get("/admin/stats")).json()
            return bool(stats["generated"] == 3 * 30)

        await wait_until(all_generated, timeout=10, what="the live feed to reach 30 per agent")
        assert await truth(growing) == await truth(ground)


async def test_fault_decisions_replay_for_the_same_seed() -> None:
    config = sim_config(faults=FaultKnobs(server_error_rate=0.5, too_many_requests_rate=0.2))

    async def statuses(client: httpx.AsyncClient) -> list[int]:
        return [(await get_page(client, "agent-0001")).status_code for _ in range(30)]

    async with simulator(config) as first, simulator(config) as second:
        one, two = await statuses(first), await statuses(second)
    assert one == two
    assert {200, 429} <= set(one) and set(one) & {500, 502, 503, 504}


# --- the feed contract ----------------------------------------------------------------------


async def test_pages_hold_items_strictly_after_since_oldest_first_until_caught_up() -> None:
    async with simulator(sim_config()) as client:
        expected = [tx["id"] for tx in await truth(client, "agent-0002", "casino")]
        seen: list[str] = []
        since = None
        while page := items(await get_page(client, "agent-0002", since, limit=7)):
            assert len(page) <= 7
            seen += [tx["id"] for tx in page]
            since = page[-1]["id"]
        assert seen == expected
        assert items(await get_page(client, "agent-0002", since)) == []


async def test_limit_defaults_to_100_and_is_capped_at_1000() -> None:
    async with simulator(sim_config(agents=1, backlog=2500, history=2500)) as client:
        assert len(items(await get_page(client, "agent-0001"))) == 100
        assert len(items(await get_page(client, "agent-0001", limit=5000))) == 1000
        assert (await get_page(client, "agent-0001", limit=0)).status_code == 400


FEED_TYPES = {
    "casino": {"register", "bet", "win", "deposit", "withdraw", "fee"},
    "trading": {"trade"},
    "escrow": {"escrow", "escrow_release"},
    "wallet": {"transfer_in", "transfer_out"},
    "domains": {"domain_purchase"},
}


async def test_every_transaction_has_the_documented_fields_on_its_services_feed() -> None:
    async with simulator(sim_config(agents=2, backlog=600)) as client:
        feeds = (await client.get("/admin/feeds")).json()["feeds"]
        pages = {feed: items(await get_page(client, "agent-0001", limit=1000, feed=feed)) for feed in feeds}
    assert feeds == {f: "" if f == "casino" else f"/{f}" for f in FEEDS}
    assert pages["casino"][0]["type"] == "register" and pages["casino"][0]["amount"] == "0"
    for feed, page in pages.items():
        assert len({tx["id"] for tx in page}) == len(page)
        assert [tx["created_at"] for tx in page] == sorted(tx["created_at"] for tx in page)
        for tx in page:
            assert {"id", "type", "amount", "asset", "created_at"} <= tx.keys()
            assert tx["created_at"].endswith("Z")
            parse_amount(tx["amount"])
        assert FEED_TYPES.get(feed, set()) <= {tx["type"] for tx in page}, feed
    assert {tx["type"] for tx in pages["faucet"]} <= {"faucet"}


async def test_an_unknown_since_is_a_400_with_a_json_error() -> None:
    async with simulator(sim_config()) as client:
        other_agents_id = (await truth(client, "agent-0002"))[0]["id"]
        for since in ("no-such-id", other_agents_id):
            response = await get_page(client, "agent-0001", since)
            assert response.status_code == 400
            assert response.json()["error"] == "unknown_since"


async def test_a_missing_or_unknown_key_is_401_and_another_agents_key_is_403() -> None:
    async with simulator(sim_config()) as client:
        params = {"agent_id": "agent-0001"}
        assert (await client.get("/transactions", params=params)).status_code == 401
        unknown = {"Authorization": "Bearer key-nobody"}
        assert (await client.get("/transactions", params=params, headers=unknown)).status_code == 401
        others = bearer("agent-0002")
        assert (await client.get("/transactions", params=params, headers=others)).status_code == 403
        agents = (await client.get("/admin/agents")).json()["agents"]
        assert agents[0] == {"agent_id": "agent-0001", "api_key": "key-agent-0001"}


# --- faults ---------------------------------------------------------------------------------


async def test_a_429_carries_retry_after_and_stops_when_faults_are_turned_off() -> None:
    async with simulator(sim_config()) as client:
        await set_faults(client, too_many_requests_rate=1.0, retry_after=0)
        throttled = await get_page(client, "agent-0001")
        assert throttled.status_code == 429
        assert throttled.headers["Retry-After"] == "0"
        await set_faults(client, too_many_requests_rate=0.0)
        assert (await get_page(client, "agent-0001")).status_code == 200
        assert (await client.get("/admin/stats")).json()["too_many_requests"] == 1


async def test_server_errors_and_hangs_are_injected_until_turned_off() -> None:
    async with simulator(sim_config()) as client:
        await set_faults(client, server_error_rate=1.0)
        assert (await get_page(client, "agent-0001")).status_code in {500, 502, 503, 504}
        await set_faults(client, server_error_rate=0.0, hang_rate=1.0, hang_s=30.0)
        with pytest.raises(httpx.ReadTimeout):
            await client.get(
                "/transactions",
                params={"agent_id": "agent-0001"},
                headers=bearer("agent-0001"),
                timeout=0.3,
            )
        await set_faults(client, hang_rate=0.0)
        assert (await get_page(client, "agent-0001")).status_code == 200


async def test_a_repeated_page_starts_a_few_items_before_since_yet_makes_progress() -> None:
    async with simulator(sim_config(faults=FaultKnobs(repeat_page_rate=1.0))) as client:
        ids = [tx["id"] for tx in await truth(client, "agent-0001", "casino")]
        since = ids[19]
        for _ in range(10):
            page = [tx["id"] for tx in items(await get_page(client, "agent-0001", since, 5))]
            first = ids.index(page[0])
            assert 17 <= first <= 19  # one to three items repeated
            assert page == ids[first : first + 5]  # contiguous, oldest first
            assert ids[20] in page
        assert items(await get_page(client, "agent-0001", since, limit=1))[0]["id"] == ids[20]


async def test_fault_knobs_out_of_range_are_rejected() -> None:
    async with simulator(sim_config()) as client:
        assert (await client.post("/admin/faults", json={"hang_rate": 1.5})).status_code == 400
        assert (await client.post("/admin/faults", json={"bogus": 1})).status_code == 400


# --- malformed items ------------------------------------------------------------------------

# What each kind of malformed item looks like once parsed (stdlib json, floats as Decimal).
LOOKS_MALFORMED: dict[str, Callable[[Tx, str], bool]] = {
    "amount_nan": lambda tx, raw: tx["amount"] == "NaN",
    "amount_infinity": lambda tx, raw: tx["amount"] == "Infinity",
    "amount_negative_infinity": lambda tx, raw: tx["amount"] == "-Infinity",
    "amount_overflow_1e309": lambda tx, raw: tx["amount"] == Decimal("1e309"),
    "amount_400_digits": lambda tx, raw: len(str(tx["amount"])) == 400,
    "amount_negative": lambda tx, raw: tx["amount"].startswith("-"),
    "amount_true": lambda tx, raw: tx["amount"] is True,
    "amount_null": lambda tx, raw: tx["amount"] is None,
    "amount_list": lambda tx, raw: tx["amount"] == [1],
    "amount_object": lambda tx, raw: tx["amount"] == {"v": 1},
    "amount_text": lambda tx, raw: tx["amount"] == "12abc",
    "missing_id": lambda tx, raw: "id" not in tx,
    "missing_type": lambda tx, raw: "type" not in tx,
    "huge_string": lambda tx, raw: len(tx["memo"]) >= 2_000_000,
    "nul_in_string": lambda tx, raw: "\x00" in tx["memo"],
    "lone_surrogate": lambda tx, raw: "\ud800" in tx["memo"],
    "duplicate_amount_key": lambda tx, raw: raw.count('"amount":') == 2,
}


async def test_malformed_items_appear_at_the_configured_rate_and_are_flagged_in_truth() -> None:
    config = sim_config(agents=2, backlog=200, faults=FaultKnobs(malformed_rate=0.25))
    async with simulator(config) as client:
        generated = len(await truth(client, "agent-0001"))
        known = await truth(client, "agent-0001", "casino")  # malformed items are the casino's
        response = await get_page(client, "agent-0001", limit=1000)
    # The page is exactly the truth's raw items, and still valid JSON however odd they are.
    assert response.content == b'{"transactions":[%s]}' % ",".join(t["raw"] for t in known).encode()
    served = items(response)
    assert generated == 200 and len(served) == len(known)
    malformed = [(tx, t) for tx, t in zip(served, known, strict=True) if t["malformed"]]
    assert 0.15 < len(malformed) / generated < 0.35
    assert {t["malformed"] for _, t in malformed} == set(MALFORMED_KINDS) == LOOKS_MALFORMED.keys()
    for tx, t in malformed:
        assert LOOKS_MALFORMED[t["malformed"]](tx, t["raw"]), t["malformed"]
        assert t["id"] == tx.get("id") and t["type"] == tx.get("type")


async def test_no_malformed_items_without_a_malformed_rate() -> None:
    async with simulator(sim_config(backlog=300)) as client:
        assert all(t["malformed"] is None for t in await truth(client))


# --- balances -------------------------------------------------------------------------------

CREDITS = {"deposit", "win", "faucet", "escrow_release", "transfer_in", "domain_sale"}
DEBITS = {"withdraw", "bet", "fee", "escrow", "transfer_out", "domain_purchase", "domain_renewal"}
NO_EFFECT = {"register", "airdrop_v2"}


def fold(txs: list[Tx]) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """Balances and escrow after ``txs``, checking every documented invariant on the way."""
    balance: dict[str, Decimal] = {}
    locked: dict[str, tuple[str, Decimal]] = {}
    previous: Tx | None = None
    for tx in txs:
        amount, asset = parse_amount(tx["amount"]), tx.get("asset", "PFLEA")
        deltas: list[tuple[str, Decimal]] = []
        kind = tx["type"]
        if kind in CREDITS:
            deltas = [(asset, amount)]
        elif kind in DEBITS:
            deltas = [(asset, -amount)]
        elif kind == "trade":
            quantity, price = Decimal(tx["quantity"]), Decimal(tx["price"])
            assert amount == quantity * price and asset == "USDC"
            sign = 1 if tx["side"] == "buy" else -1
            deltas = [(asset, -sign * amount), (tx["instrument"], sign * quantity)]
        elif kind == "swap":
            deltas = [(asset, -amount), (tx["to_asset"], Decimal(tx["to_amount"]))]
        else:
            assert kind in NO_EFFECT, kind
        if kind == "escrow":
            locked[tx["escrow_id"]] = (asset, amount)
        if kind == "escrow_release":
            assert locked.pop(tx["escrow_id"]) == (asset, amount)
        if kind == "win":
            assert previous is not None and previous["type"] == "bet"
            assert amount == 2 * parse_amount(previous["amount"])
            assert tx["game"] == previous["game"]
        for key, delta in deltas:
            balance[key] = balance.get(key, Decimal(0)) + delta
            assert balance[key] >= 0, (tx["id"], key, balance[key])
        previous = tx
    escrow: dict[str, Decimal] = {}
    for asset, amount in locked.values():
        escrow[asset] = escrow.get(asset, Decimal(0)) + amount
    return balance, escrow


def well_formed(known: list[Tx]) -> list[Tx]:
    return [json.loads(t["raw"], parse_float=Decimal) for t in known if t["malformed"] is None]


def as_decimals(amounts: dict[str, str]) -> dict[str, Decimal]:
    return {asset: Decimal(text) for asset, text in amounts.items()}


async def test_simulated_balances_never_go_negative_and_match_the_truth() -> None:
    faults = FaultKnobs(malformed_rate=0.1)
    config = sim_config(agents=4, backlog=400, numeric_amount_rate=0.3, faults=faults)
    async with simulator(config) as client:
        reported = (await client.get("/admin/balances")).json()["balances"]
        for agent_id in reported:
            balance, escrow = fold(well_formed(await truth(client, agent_id)))
            assert balance == as_decimals(reported[agent_id]["available"])
            assert escrow == as_decimals(reported[agent_id]["escrow"])


# --- commands -------------------------------------------------------------------------------


async def place_bet(client: httpx.AsyncClient, amount: Any, key: str | None = None) -> httpx.Response:
    headers = bearer("agent-0001") | ({"Idempotency-Key": key} if key else {})
    body = b'{"agent_id":"agent-0001","game":"dice","amount":%s}' % str(amount).encode()
    return await client.post("/bet", content=body, headers=headers)


async def test_a_bet_answers_its_outcome_and_the_casino_feed_reports_it_with_its_bet_id() -> None:
    async with simulator(sim_config()) as client:
        last_before = (await truth(client, "agent-0001", "casino"))[-1]["id"]
        answers = [(await place_bet(client, "1.50")).json(parse_float=Decimal) for _ in range(12)]
        appended = items(await get_page(client, "agent-0001", last_before, 1000))
        balance, _ = fold(well_formed(await truth(client, "agent-0001")))
    expected: list[tuple[str, str, Decimal]] = []
    for answer in answers:
        assert set(answer) == {"bet_id", "outcome", "payout"}
        assert answer["outcome"] in ("win", "loss")
        assert answer["payout"] == (Decimal("3.00") if answer["outcome"] == "win" else 0)
        expected.append((answer["bet_id"], "bet", Decimal("1.50")))
        if answer["outcome"] == "win":
            expected.append((answer["bet_id"], "win", answer["payout"]))
    assert [(tx["bet_id"], tx["type"], parse_amount(tx["amount"])) for tx in appended] == expected
    assert {a["outcome"] for a in answers} == {"win", "loss"}
    assert all(amount >= 0 for amount in balance.values())


async def test_a_repeated_idempotency_key_gets_the_first_answer_and_places_nothing_more() -> None:
    async with simulator(sim_config()) as client:
        first = await place_bet(client, "2", key="k-1")
        before = await truth(client, "agent-0001")
        again = await place_bet(client, "2", key="k-1")
        assert again.content == first.content and await truth(client, "agent-0001") == before
        other = await place_bet(client, "2", key="k-2")
        assert other.json()["bet_id"] != first.json()["bet_id"]


async def test_a_bet_beyond_the_balance_is_refused_with_409_and_appends_nothing() -> None:
    async with simulator(sim_config()) as client:
        before = await truth(client, "agent-0001")
        response = await place_bet(client, "1000000000")
        assert response.status_code == 409
        assert response.json()["error"] == "insufficient_funds"
        assert await truth(client, "agent-0001") == before


async def test_a_faucet_claim_answers_its_tx_id_which_the_faucet_feed_reports() -> None:
    async with simulator(sim_config(faucet_limit=1)) as client:
        first = await client.post(
            "/faucet/claim", json={"agent_id": "agent-0003"}, headers=bearer("agent-0003")
        )
        refused = await client.post(
            "/faucet/claim", json={"agent_id": "agent-0003"}, headers=bearer("agent-0003")
        )
        feed = items(await get_page(client, "agent-0003", feed="faucet"))
    claim = first.json(parse_float=Decimal)
    assert claim["success"] is True and claim["amount"] == Decimal("10.00")
    assert [(tx["id"], tx["type"]) for tx in feed if tx["id"] == claim["tx_id"]] == [
        (claim["tx_id"], "faucet")
    ]
    assert refused.status_code == 200 and refused.json()["success"] is False


async def test_commands_need_the_agents_own_key() -> None:
    async with simulator(sim_config()) as client:
        body = {"agent_id": "agent-0001"}
        assert (await client.post("/faucet/claim", json=body)).status_code == 401
        other = bearer("agent-0002")
        assert (await client.post("/faucet/claim", json=body, headers=other)).status_code == 403
        assert (
            await client.post("/bet", json={**body, "game": "dice", "amount": 1}, headers=other)
        ).status_code == 403


# --- configuration and process --------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PFLEA_SIM_PORT": "eighty"}, "PFLEA_SIM_PORT"),
        ({"PFLEA_SIM_PORT": "70000"}, "PFLEA_SIM_PORT"),
        ({"PFLEA_SIM_AGENTS": "0"}, "PFLEA_SIM_AGENTS"),
        ({"PFLEA_SIM_RATE": "-1"}, "PFLEA_SIM_RATE"),
        ({"PFLEA_SIM_429_RATE": "1.5"}, "PFLEA_SIM_429_RATE"),
        ({"PFLEA_SIM_RETRY_AFTER": "soon"}, "PFLEA_SIM_RETRY_AFTER"),
        ({"PFLEA_SIM_HANG_S": "nan"}, "PFLEA_SIM_HANG_S"),
        ({"PFLEA_SIM_MALFORMED_RATE": "lots"}, "PFLEA_SIM_MALFORMED_RATE"),
    ],
)
def test_a_bad_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_simulator_config(env)
    assert info.value.variable == variable


def test_settings_are_read_from_the_environment() -> None:
    config = load_simulator_config(
        {"PFLEA_SIM_PORT": "0", "PFLEA_SIM_SEED": "42", "PFLEA_SIM_RETRY_AFTER": "0"}
    )
    assert (config.port, config.seed, config.faults.retry_after) == (0, 42, 0)
    assert (config.agents, config.backlog, config.rate) == (20, 50, 100.0)


class SimulatorProcess(msgspec.Struct):
    proc: asyncio.subprocess.Process
    url: str = ""


@asynccontextmanager
async def simulator_process(**settings: str) -> AsyncIterator[SimulatorProcess]:
    """``python -m services.simulator`` with ``settings`` (``PFLEA_SIM_*``); killed at exit if alive."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFLEA_")}
    env.update(PFLEA_SIM_PORT="0", PYTHONUNBUFFERED="1", **settings)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.simulator", cwd=REPO, env=env,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield SimulatorProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def listening(sim: SimulatorProcess) -> str:
    """The URL the process logs once it serves."""
    assert sim.proc.stderr is not None
    line = await asyncio.wait_for(sim.proc.stderr.readline(), timeout=20)
    sim.url = msgspec.json.decode(line)["url"]
    return sim.url


async def stop(sim: SimulatorProcess) -> int:
    sim.proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(sim.proc.wait(), timeout=20)


async def test_the_process_logs_its_url_and_exits_0_on_sigterm() -> None:
    async with simulator_process(PFLEA_SIM_AGENTS="2") as sim:
        async with httpx.AsyncClient(base_url=await listening(sim)) as client:
            agents = (await client.get("/admin/agents")).json()["agents"]
        assert len(agents) == 2
        assert await stop(sim) == 0


# --- the epoch: a restarted simulator serves what it served before --------------------------


async def test_a_simulator_restarted_on_the_same_state_dir_still_knows_the_ingesters_cursor(
    tmp_path: Path,
) -> None:
    settings = {
        "PFLEA_SIM_STATE_DIR": str(tmp_path / "state"),
        "PFLEA_SIM_SEED": "11",
        "PFLEA_SIM_AGENTS": "2",
        "PFLEA_SIM_BACKLOG": "5",
        "PFLEA_SIM_RATE": "400",
    }
    async with simulator_process(**settings) as first:
        async with httpx.AsyncClient(base_url=await listening(first), timeout=10) as client:

            async def grown() -> list[Tx]:
                served = items(await get_page(client, "agent-0001", limit=1000))
                return served if len(served) >= 60 else []

            served = await wait_until(grown, timeout=20, what="the live feed to pass its backlog")
        assert await stop(first) == 0
    cursor = served[-1]["id"]

    async with simulator_process(**settings) as second:
        async with httpx.AsyncClient(base_url=await listening(second), timeout=10) as client:
            assert (await get_page(client, "agent-0001", since=cursor)).status_code == 200
            assert items(await get_page(client, "agent-0001", limit=len(served))) == served
        assert await stop(second) == 0

    # Without the kept epoch a new simulator has only its backlog: the cursor is unknown to it.
    fresh = sim_config(seed=11, agents=2, backlog=5)
    async with simulator(fresh) as client:
        response = await get_page(client, "agent-0001", since=cursor)
        assert (response.status_code, response.json()["error"]) == (400, "unknown_since")


def test_the_first_start_keeps_its_epoch_for_the_owner_only_and_later_starts_read_it(
    tmp_path: Path,
) -> None:
    before = time.time()
    epoch = kept_epoch(tmp_path)
    assert before <= epoch <= time.time()
    assert [p.name for p in tmp_path.iterdir()] == [EPOCH_FILE]  # no temp file left behind
    assert (tmp_path / EPOCH_FILE).stat().st_mode & 0o777 == 0o600
    assert kept_epoch(tmp_path) == epoch


def test_an_epoch_file_that_pflea_up_wrote_before_is_read_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "simulator.json").write_bytes(b'{"epoch": 1700000000.25}')
    assert feed_epoch(sim_config(state_dir=str(tmp_path))) == 1700000000.25


def test_an_explicit_epoch_wins_over_the_state_dir(tmp_path: Path) -> None:
    assert feed_epoch(sim_config(epoch=1700000000.0, state_dir=str(tmp_path))) == 1700000000.0
    assert feed_epoch(sim_config()) == 0.0
    assert list(tmp_path.iterdir()) == []


async def test_an_unusable_state_dir_stops_the_process_naming_the_variable(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    async with simulator_process(PFLEA_SIM_STATE_DIR=str(not_a_folder)) as sim:
        assert await asyncio.wait_for(sim.proc.wait(), timeout=20) == 2
        assert sim.proc.stderr is not None
        assert b"PFLEA_SIM_STATE_DIR" in await sim.proc.stderr.read()
