"""The IMAP front door, one concern per module:

- `connection`: settings checks, TLS, passwords, accounts, backoff, connect errors;
- `session`: one logged-in connection (`ImapSession`, `open_session`);
- `fetch`: reading a FETCH answer straight off the socket;
- `actions`: acting on verdicts in a mailbox (shared with backfill);
- `listener`: the IDLE listener (`run_idle`).

The only package that imports imapclient. Its modules log as "atlas_milter.adapters.imap",
the name the single module had, so log filters and level settings keep working. Import
from the module that owns a name; this file re-exports nothing.
"""
