"""atlas-milter: one mail-classification core behind three front doors (milter, IMAP IDLE, backfill)."""

__version__ = "0.1.0"
