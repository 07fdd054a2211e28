"""What the tests and the bench scripts share: private server instances (servers), the milter
as a subprocess (milter_process), mail over SMTP (smtp), the IMAP tests' helpers (imap), the shared corpus (corpus) and what
a test needs to run at all (requirements). Imported as `tests.support.<module>`; nothing
here imports pytest except requirements."""
