"""What a simulated agent does next: the economics of the feed, one draft at a time.

Each agent has its own ``random.Random`` stepped once per draft, and a :class:`Wallet` updated
as drafts are made, so draft *k* depends only on (seed, agent, k) - unless a command
(``POST /bets``, ``POST /faucet``) changed the wallet in between. Every debit is checked
against the wallet first; a draft that the agent cannot afford becomes a deposit instead.
Bets lose on average: a win pays twice the stake with probability :data:`WIN_PROBABILITY`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import ROUND_CEILING, ROUND_DOWN, Decimal

import msgspec

from shared.money import MONEY_CONTEXT

from .wallet import Wallet

WIN_PROBABILITY = 0.49
WIN_MULTIPLIER = Decimal(2)
UNKNOWN_TYPE = "airdrop_v2"

# Decimal places each asset is quoted in.
PLACES = {"PFLEA": 2, "USDC": 2, "BTC": 8, "ETH": 8}
PRICES = {"BTC": (Decimal("55000"), Decimal("70000")), "ETH": (Decimal("2500"), Decimal("4000"))}
GAMES = ("dice", "coinflip", "roulette", "crash", "blackjack")
CHAINS = ("ethereum", "base", "solana", "bitcoin")
DOMAIN_WORDS = ("agent", "oracle", "alpha", "quant", "flea", "vault", "signal", "swarm")


class Draft(msgspec.Struct, frozen=True):
    """A well-formed transaction before it gets an id and a timestamp."""

    type: str
    amount: Decimal
    asset: str = "PFLEA"
    fields: tuple[tuple[str, str | Decimal], ...] = ()


def draw_amount(rng: random.Random, asset: str, low: Decimal, high: Decimal) -> Decimal | None:
    """A uniform amount in [low, high] at the asset's precision, or None if the range is empty."""
    places = PLACES.get(asset, 2)
    low_units = int(low.scaleb(places).to_integral_value(rounding=ROUND_CEILING))
    high_units = int(high.scaleb(places))
    if high_units < max(low_units, 1):
        return None
    return Decimal(rng.randint(max(low_units, 1), high_units)).scaleb(-places)


def _address(rng: random.Random) -> str:
    return f"0x{rng.getrandbits(160):040x}"


Maker = Callable[[random.Random, Wallet, str], "Draft | None"]


def _deposit(rng: random.Random, wallet: Wallet, tag: str) -> Draft:
    asset = rng.choices(("PFLEA", "USDC", "BTC"), weights=(6, 3, 1))[0]
    high = {"PFLEA": Decimal(500), "USDC": Decimal(1000), "BTC": Decimal("0.05")}[asset]
    amount = draw_amount(rng, asset, high / 50, high)
    assert amount is not None
    wallet.credit(asset, amount)
    return Draft("deposit", amount, asset)


def _spend(
    rng: random.Random, wallet: Wallet, asset: str, low: Decimal, high: Decimal, share: Decimal
) -> Decimal | None:
    """An amount the wallet can pay: at most ``share`` of the balance; debits it."""
    amount = draw_amount(rng, asset, low, min(high, wallet.balance(asset) * share))
    if amount is not None:
        wallet.debit(asset, amount)
    return amount


def _held(rng: random.Random, wallet: Wallet, among: tuple[str, ...]) -> str | None:
    held = [asset for asset in wallet.held_assets() if asset in among]
    return rng.choice(held) if held else None


def _withdraw(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    asset = _held(rng, wallet, ("PFLEA", "USDC", "BTC"))
    if asset is None:
        return None
    amount = _spend(rng, wallet, asset, Decimal(0), Decimal(10**6), Decimal("0.5"))
    return None if amount is None else Draft("withdraw", amount, asset, (("address", _address(rng)),))


def _fee(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    amount = _spend(rng, wallet, "PFLEA", Decimal("0.01"), Decimal(2), Decimal("0.1"))
    reason = rng.choice(("trading", "withdrawal", "escrow"))
    return None if amount is None else Draft("fee", amount, "PFLEA", (("reason", reason),))


def _faucet(rng: random.Random, wallet: Wallet, tag: str) -> Draft:
    amount = draw_amount(rng, "PFLEA", Decimal(1), Decimal(25))
    assert amount is not None
    wallet.credit("PFLEA", amount)
    return Draft("faucet", amount)


def _escrow(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    asset = _held(rng, wallet, ("PFLEA", "USDC"))
    if asset is None:
        return None
    amount = draw_amount(rng, asset, Decimal(1), min(Decimal(200), wallet.balance(asset) / 3))
    if amount is None:
        return None
    escrow_id = f"esc-{tag}"
    wallet.lock(escrow_id, asset, amount)
    return Draft("escrow", amount, asset, (("escrow_id", escrow_id),))


def _escrow_release(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    if not wallet.escrows:
        return None
    escrow_id = next(iter(wallet.escrows))  # the oldest lock is released first
    asset, amount = wallet.release(escrow_id)
    return Draft("escrow_release", amount, asset, (("escrow_id", escrow_id),))


def _trade(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    instrument = rng.choice(tuple(PRICES))
    low, high = PRICES[instrument]
    price = draw_amount(rng, "USDC", low, high)
    assert price is not None
    side = rng.choice(("buy", "sell"))
    if side == "buy":
        affordable = wallet.balance("USDC") / 2 / price
        quantity = draw_amount(rng, instrument, Decimal("0.00001"), min(Decimal("0.02"), affordable))
    else:
        held = wallet.balance(instrument)
        quantity = draw_amount(rng, instrument, Decimal("0.00001"), held)
    if quantity is None:
        return None
    notional = MONEY_CONTEXT.multiply(quantity, price)
    if side == "buy":
        wallet.debit("USDC", notional)
        wallet.credit(instrument, quantity)
    else:
        wallet.debit(instrument, quantity)
        wallet.credit("USDC", notional)
    fields = (("side", side), ("instrument", instrument), ("quantity", quantity), ("price", price))
    return Draft("trade", notional, "USDC", fields)


def _swap(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    source = _held(rng, wallet, ("PFLEA", "USDC"))
    if source is None:
        return None
    target = "USDC" if source == "PFLEA" else "PFLEA"
    pflea_price = Decimal(rng.randint(400, 600)).scaleb(-4)  # USDC per PFLEA
    amount = _spend(rng, wallet, source, Decimal(1), Decimal(500), Decimal("0.3"))
    if amount is None:
        return None
    rate = pflea_price if source == "PFLEA" else 1 / pflea_price
    to_amount = MONEY_CONTEXT.multiply(amount, rate).quantize(Decimal("0.01"), ROUND_DOWN)
    wallet.credit(target, to_amount)
    return Draft("swap", amount, source, (("to_asset", target), ("to_amount", to_amount)))


def _transfer_in(rng: random.Random, wallet: Wallet, tag: str) -> Draft:
    asset = rng.choice(("USDC", "BTC", "PFLEA"))
    high = {"PFLEA": Decimal(300), "USDC": Decimal(500), "BTC": Decimal("0.02")}[asset]
    amount = draw_amount(rng, asset, high / 100, high)
    assert amount is not None
    wallet.credit(asset, amount)
    fields = (("address", _address(rng)), ("chain", rng.choice(CHAINS)))
    return Draft("transfer_in", amount, asset, fields)


def _transfer_out(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    asset = _held(rng, wallet, ("USDC", "BTC", "PFLEA"))
    if asset is None:
        return None
    amount = _spend(rng, wallet, asset, Decimal(0), Decimal(10**6), Decimal("0.4"))
    fields = (("address", _address(rng)), ("chain", rng.choice(CHAINS)))
    return None if amount is None else Draft("transfer_out", amount, asset, fields)


def _domain_purchase(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    amount = _spend(rng, wallet, "PFLEA", Decimal(5), Decimal(50), Decimal("0.5"))
    if amount is None:
        return None
    domain = f"{rng.choice(DOMAIN_WORDS)}-{tag}.pflea"
    wallet.domains.append(domain)
    return Draft("domain_purchase", amount, "PFLEA", (("domain", domain),))


def _domain_renewal(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    if not wallet.domains:
        return None
    domain = rng.choice(wallet.domains)
    amount = _spend(rng, wallet, "PFLEA", Decimal(2), Decimal(10), Decimal("0.5"))
    return None if amount is None else Draft("domain_renewal", amount, "PFLEA", (("domain", domain),))


def _domain_sale(rng: random.Random, wallet: Wallet, tag: str) -> Draft | None:
    if not wallet.domains:
        return None
    domain = wallet.domains.pop(rng.randrange(len(wallet.domains)))
    amount = draw_amount(rng, "PFLEA", Decimal(5), Decimal(120))
    assert amount is not None
    wallet.credit("PFLEA", amount)
    return Draft("domain_sale", amount, "PFLEA", (("domain", domain),))


def _unknown(rng: random.Random, wallet: Wallet, tag: str) -> Draft:
    # A type the ledger does not know yet; it has no money effect and must be kept verbatim.
    amount = draw_amount(rng, "PFLEA", Decimal(1), Decimal(100))
    assert amount is not None
    return Draft(UNKNOWN_TYPE, amount, "PFLEA", (("campaign", f"season-{rng.randint(1, 9)}"),))


# Bets are handled by AgentActivity itself: they queue the win that follows them.
MAKERS: dict[str, Maker] = {
    "deposit": _deposit,
    "withdraw": _withdraw,
    "fee": _fee,
    "faucet": _faucet,
    "escrow": _escrow,
    "escrow_release": _escrow_release,
    "trade": _trade,
    "swap": _swap,
    "transfer_in": _transfer_in,
    "transfer_out": _transfer_out,
    "domain_purchase": _domain_purchase,
    "domain_renewal": _domain_renewal,
    "domain_sale": _domain_sale,
    UNKNOWN_TYPE: _unknown,
}
WEIGHTS: dict[str, int] = {
    "bet": 30,
    "deposit": 8,
    "trade": 10,
    "withdraw": 4,
    "fee": 4,
    "faucet": 4,
    "escrow": 4,
    "escrow_release": 3,
    "swap": 4,
    "transfer_in": 3,
    "transfer_out": 3,
    "domain_purchase": 2,
    "domain_renewal": 1,
    "domain_sale": 1,
    UNKNOWN_TYPE: 1,
}
_TYPES = tuple(WEIGHTS)
_TYPE_WEIGHTS = tuple(WEIGHTS.values())

# What one agent holds at most: more locks than releases are drawn, and more purchases than
# sales, so without a cap an agent's open escrows and domains grow with every hour it runs (and
# so does the simulator's memory). At the cap the draw takes the opposite step instead: the
# oldest escrow is released, a held domain is sold.
MAX_OPEN_ESCROWS = 16
MAX_DOMAINS = 16


class AgentActivity:
    """The stream of one agent's well-formed drafts; :meth:`next` also updates the wallet."""

    def __init__(self, rng: random.Random, wallet: Wallet, id_prefix: str) -> None:
        self._rng = rng
        self.wallet = wallet
        self._prefix = id_prefix
        self._count = 0
        self._pending_win: Draft | None = None

    @property
    def has_pending_win(self) -> bool:
        return self._pending_win is not None

    def next(self) -> Draft:
        self._count += 1
        if self._count == 1:
            return Draft("register", Decimal(0))
        if self._pending_win is not None:
            win, self._pending_win = self._pending_win, None
            self.wallet.credit(win.asset, win.amount)
            return win
        kind = self._capped(self._rng.choices(_TYPES, weights=_TYPE_WEIGHTS)[0])
        tag = f"{self._prefix}-{self._count}"
        draft = self._bet() if kind == "bet" else MAKERS[kind](self._rng, self.wallet, tag)
        return draft if draft is not None else _deposit(self._rng, self.wallet, tag)

    def _capped(self, kind: str) -> str:
        """``kind``, or its opposite when the agent already holds as much as it may."""
        if kind == "escrow" and len(self.wallet.escrows) >= MAX_OPEN_ESCROWS:
            return "escrow_release"
        if kind == "domain_purchase" and len(self.wallet.domains) >= MAX_DOMAINS:
            return "domain_sale"
        return kind

    def _bet(self) -> Draft | None:
        rng = self._rng
        asset = "USDC" if rng.random() < 0.15 else "PFLEA"
        amount = _spend(rng, self.wallet, asset, Decimal(1), Decimal(50), Decimal("0.2"))
        if amount is None:
            return None
        game = rng.choice(GAMES)
        if rng.random() < WIN_PROBABILITY:
            payout = MONEY_CONTEXT.multiply(amount, WIN_MULTIPLIER)
            self._pending_win = Draft("win", payout, asset, (("game", game),))
        return Draft("bet", amount, asset, (("game", game),))
