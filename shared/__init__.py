"""The library every Purple Flea ledger service imports."""

from shared import money as _money  # noqa: F401  (sets exact Decimal arithmetic on import)
