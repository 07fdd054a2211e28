"""The console's test helpers: an MTA hold queue in memory (the edge of the process; the
end-to-end test drives a real Postfix), hostile subjects, and a verdict database with
decisions that held messages."""

from __future__ import annotations

from atlas_milter.errors import AtlasError
from atlas_milter.mta_queue import Held
from atlas_milter.store import DirectRecordWriter

TOKEN = "t0ken-for-tests"
HOSTILE = [
    "<script>document.title='PWNED'</script>",
    "<img src=x onerror=\"document.title='PWNED'\">",
    "\u202etxt.exe\u202c invoice",
    "\"><svg onload=alert(1)>",
]
SPAM_REASONS = [["body:viagra", 1.25], ["meta:no_date", 0.5]]


class MemoryQueue:
    """An MTA hold queue in memory: what PostfixQueue does, without Postfix."""

    name = "memory"

    def __init__(self, held: dict[str, bytes]) -> None:
        self.messages = dict(held)
        self.released: list[str] = []
        self.deleted: list[str] = []

    def held(self) -> list[Held]:
        return [Held(qid, 1_800_000_000 + i, len(raw), "s@spam.example", ("user@example.test",))
                for i, (qid, raw) in enumerate(self.messages.items())]

    def read(self, queue_id: str) -> bytes:
        if queue_id not in self.messages:
            raise AtlasError(f"{queue_id}: not held")
        return self.messages[queue_id]

    def release(self, queue_id: str) -> None:
        self.read(queue_id)
        self.released.append(queue_id)
        del self.messages[queue_id]

    def delete(self, queue_id: str) -> None:
        self.read(queue_id)
        self.deleted.append(queue_id)
        del self.messages[queue_id]


def held_raw(subject: str) -> bytes:
    return (f"Received: by mx.atlas.test\nFrom: s@spam.example\nTo: user@example.test\nSubject: {subject}\n"
            f"X-Atlas-Verdict: spam\nX-Spam-Flag: YES\n\nCheap pills, <b>secret body line</b>\n").encode()


def make_site(tmp_path):
    db = tmp_path / "v.db"
    writer = DirectRecordWriter(db)
    for i, subject in enumerate(HOSTILE + ["an ordinary subject"]):
        writer.add_email_record({"source": "milter", "queue_id": f"4QAAA{i:05d}", "sender": f"x{i}@spam.example",
                                 "subject": subject, "score": 0.97, "verdict": "spam", "action": "quarantine",
                                 "reasons": SPAM_REASONS, "note": f"ref=REF{i:07d}", "model_version": "m-1",
                                 "spam_cutoff": 0.9, "ham_cutoff": 0.3, "recipients_count": 1, "elapsed_ms": 4.5})
    writer.add_email_record({"source": "imap", "account": "", "folder": "INBOX", "uidvalidity": 7, "uid": 12,
                             "sender": "friend@ham.example", "subject": "lunch", "score": 0.02, "verdict": "ham",
                             "action": "none", "reasons": [["body:lunch", -1.0]]})
    writer.close()
    queue = MemoryQueue({"4QAAA00000": held_raw(HOSTILE[0]), "4QAAA00004": held_raw("an ordinary subject"),
                         "4QAAA00001": held_raw(HOSTILE[1])})
    return db, queue


