"""The library every Purple Flea ledger service imports."""
