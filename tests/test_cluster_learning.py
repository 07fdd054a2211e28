"""Shared learning between hosts through a real Redis (Debian's redis-server, private, with
an append-only file): each "host" is a ClusterLearning with its own verdict database and
model, as in a daemon. A learn on host A reaches host B within a second; the same message
learned on two hosts is one event; with Redis killed or frozen a learn returns at once,
counts on its host, waits in the outbox (surviving a restart) and reaches every host
exactly once after Redis returns; all hosts end with the same weights and version."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib import resources

import pytest

from tests.support.requirements import require_binary
from tests.support.servers import RedisInstance, private_tmpdir, wait_until

from atlas_milter.classifier import load_model
from atlas_milter.cluster_sync import ClusterLearning
from atlas_milter.message import parse_message
from atlas_milter.migrate import apply_migrations
from atlas_milter.redis_link import RedisLink

pytestmark = pytest.mark.integration

SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
SPAM = [(SAMPLE / name).read_bytes() for name in ("07-crypto-scam.eml", "09-phishing.eml", "10-lottery.eml")]
MAX_BYTES = 512 * 1024


@pytest.fixture
def redis_server():
    require_binary("redis-server")
    server = RedisInstance(private_tmpdir("atlas-redis-")).start()
    yield server
    server.stop()


class Host:
    """One daemon's shared learning, and the model it would score with."""

    def __init__(self, tmp_path, name: str, url: str, sentinels: tuple[str, ...] = (), min_replicas: int = 0,
                 compact_every: int = 1000, keep_stream: float = 600.0, redis_cluster: bool = False) -> None:
        self.db = tmp_path / f"{name}.db"
        apply_migrations(self.db)
        self.model = load_model()
        self.swaps = 0

        def use_model(model):
            self.model = model
            self.swaps += 1

        link = RedisLink(url, sentinels, timeout=0.25, cooldown=0.2, min_replicas=min_replicas, redis_cluster=redis_cluster)
        self.cluster = ClusterLearning(link, str(self.db), load_model(), use_model, host=name, max_bytes=MAX_BYTES,
                                       compact_every=compact_every, keep_stream=keep_stream)
        self.cluster.start()

    def score(self, raw: bytes) -> float:
        return self.model.score(parse_message(raw, MAX_BYTES)).score

    def status(self) -> dict:
        return self.cluster.status()


@pytest.fixture
def hosts(tmp_path, redis_server):
    made = [Host(tmp_path, name, redis_server.url) for name in ("mx1", "mx2", "mx3")]
    yield made
    for host in made:
        host.cluster.stop()


def converged(hosts) -> bool:
    """Every host at the same stream position with nothing waiting, and that model in force."""
    states = [h.status() for h in hosts]
    return (len({(s["version"], s["position"]) for s in states}) == 1 and not any(s["outbox"] for s in states)
            and all(h.model.version == s["version"] for h, s in zip(hosts, states)))


def stream_length(server: RedisInstance) -> int:
    import redis

    return redis.Redis.from_url(server.url).xlen("{atlas}:learn")


def test_a_learn_on_one_host_reaches_the_others_within_a_second(hosts, redis_server):
    a, b, c = hosts
    spam = SPAM[0]
    assert b.score(spam) > 0.9
    delays = []
    for raw in SPAM:  # three learns, one after the other, each timed until every host has it
        t0 = time.monotonic()
        before, after = a.cluster.learn(raw, is_spam=False)
        assert before > 0.9 > 0.3 > after  # on host A at once
        wait_until(lambda: converged(hosts), timeout=5, what="every host at the same stream position")
        delays.append(time.monotonic() - t0)
    assert max(delays) <= 1.0, delays
    for host in (b, c):
        assert host.score(spam) < 0.3  # the learn changed host B's and C's score for that message
    assert a.model.weights == b.model.weights == c.model.weights
    assert a.model.version == b.model.version == c.model.version and "@" in a.model.version
    assert stream_length(redis_server) == 3


def test_the_same_message_learned_on_several_hosts_counts_once(hosts, redis_server):
    a, b, c = hosts
    for host in hosts:  # users on three hosts report the same message
        host.cluster.learn(SPAM[1], is_spam=False)
    wait_until(lambda: converged(hosts), timeout=5, what="every host at the same stream position")
    assert stream_length(redis_server) == 1
    assert a.model.weights == b.model.weights == c.model.weights
    assert all(h.score(SPAM[1]) < 0.3 for h in hosts)
    import redis

    seen = list(redis.Redis.from_url(redis_server.url).scan_iter("{atlas}:seen:*"))
    assert len(seen) == 1 and 29 * 86400 < redis.Redis.from_url(redis_server.url).ttl(seen[0]) <= 30 * 86400


@pytest.mark.parametrize("outage", ["kill", "freeze"])
def test_learns_during_a_redis_outage_wait_count_locally_and_arrive_once(hosts, redis_server, outage):
    a, b, c = hosts
    a.cluster.learn(SPAM[0], is_spam=False)
    wait_until(lambda: converged(hosts), timeout=5, what="the first learn everywhere")
    redis_server.kill() if outage == "kill" else redis_server.freeze()
    t0 = time.monotonic()
    before, after = a.cluster.learn(SPAM[2], is_spam=False)  # never waits for Redis
    took = time.monotonic() - t0
    b.cluster.learn(SPAM[1], is_spam=False)
    assert took < 0.5, took
    wait_until(lambda: a.score(SPAM[2]) < 0.3, timeout=1.0, what="the learn in force on A at once")
    assert c.score(SPAM[2]) > 0.9  # not yet on C
    wait_until(lambda: all(h.cluster.link.breaker.is_open for h in (a, b)), timeout=1.0,
               what="the breakers open within 1 s")
    assert a.status()["outbox"] == 1 and b.status()["outbox"] == 1

    back = time.monotonic()
    redis_server.start() if outage == "kill" else redis_server.thaw()
    wait_until(lambda: converged(hosts), timeout=10, what="every host converged after Redis returned")
    assert time.monotonic() - back <= 10
    assert stream_length(redis_server) == 3  # each learn exactly once
    assert a.model.weights == b.model.weights == c.model.weights
    assert all(h.score(s) < 0.3 for h in hosts for s in SPAM[:3])


def test_the_outbox_survives_a_restart_of_the_host(tmp_path, redis_server):
    a = Host(tmp_path, "mx1", redis_server.url)
    redis_server.kill()
    a.cluster.learn(SPAM[0], is_spam=False)
    a.cluster.stop()  # the daemon stops (or crashes) while Redis is away

    again = Host(tmp_path, "mx1", redis_server.url)  # same database: the outbox is read back
    b = Host(tmp_path, "mx2", redis_server.url)
    try:
        assert again.status()["outbox"] == 1 and again.score(SPAM[0]) < 0.3  # it counts at once again
        redis_server.start()
        wait_until(lambda: converged([again, b]), timeout=10, what="the outbox shipped after the restart")
        assert stream_length(redis_server) == 1 and b.score(SPAM[0]) < 0.3
    finally:
        again.cluster.stop()
        b.cluster.stop()


def test_a_sentinel_failover_blocks_learning_briefly_and_loses_no_learn(tmp_path):
    """One primary, one replica, three Sentinels; two hosts learn a new message every 50 ms
    while the primary is killed: the Sentinels promote the replica, learning resumes within
    5 s, and every learn is on the new primary's stream once (a learn leaves the outbox only
    when the replica has it: min_replicas = 1)."""
    import redis as redis_py

    require_binary("redis-server")
    base = private_tmpdir("atlas-sentinel-")
    primary = RedisInstance(base).start()
    replica = RedisInstance(base, replica_of=("127.0.0.1", primary.port)).start()
    sentinels = [RedisInstance(base, sentinel_of=("127.0.0.1", primary.port)).start() for _ in range(3)]
    addrs = tuple(f"127.0.0.1:{s.port}" for s in sentinels)

    def replicas_known() -> bool:  # the replica in sync, and every Sentinel knows it
        online = redis_py.Redis(port=primary.port).info("replication").get("slave0", {}).get("state") == "online"
        return online and all(redis_py.Redis(port=s.port).execute_command("SENTINEL", "REPLICAS", "atlas")
                              for s in sentinels)

    hosts = []
    try:
        wait_until(replicas_known, timeout=20, what="the Sentinels know the replica")
        hosts = [Host(tmp_path, name, "", addrs, min_replicas=1) for name in ("mx1", "mx2")]
        learned = []
        t0 = time.monotonic()
        killed_at = None
        i = 0
        while time.monotonic() - t0 < 8:
            raw = SPAM[i % 3] + f"\nfailover test {i}\n".encode()  # a new message each time
            hosts[i % 2].cluster.learn(raw, is_spam=False)
            learned.append(i)
            i += 1
            if killed_at is None and time.monotonic() - t0 > 1.5:
                primary.kill()
                killed_at = time.monotonic()
            time.sleep(0.05)
        new_primary = redis_py.Redis(port=replica.port)
        wait_until(lambda: new_primary.info("replication")["role"] == "master", timeout=10, what="the replica promoted")
        try:
            wait_until(lambda: converged(hosts), timeout=15, what="both hosts converged after the failover")
        except Exception:
            raise AssertionError(f"{[h.status() for h in hosts]} xlen {new_primary.xlen('{atlas}:learn')} "
                                 f"learned {len(learned)} role {new_primary.info('replication')['role']}")
        # Learning resumed within 5 s of the kill: the first entry written on the new primary.
        entries = new_primary.xrange("{atlas}:learn")
        ms_after_kill = [int(e[0].split(b"-")[0]) / 1000 for e in entries]
        assert len(entries) == len(learned)  # no learn lost, none twice
        assert hosts[0].model.weights == hosts[1].model.weights
        resumed = [t for t in ms_after_kill if t > time.time() - (time.monotonic() - killed_at)]
        assert resumed, "nothing written after the kill"
        blocked = resumed[0] - (time.time() - (time.monotonic() - killed_at))
        assert blocked <= 5.0, blocked
    finally:
        for host in hosts:
            host.cluster.stop()
        for server in (*sentinels, replica, primary):
            server.stop()


def learn_new_messages(host: Host, count: int, tag: str) -> None:
    for i in range(count):
        host.cluster.learn(SPAM[i % 3] + f"\n{tag} {i}\n".encode(), is_spam=False)


def snapshot_position(server: RedisInstance) -> str:
    import redis

    return (redis.Redis.from_url(server.url).hget("{atlas}:snapshot", "position") or b"").decode()


def test_the_stream_is_folded_into_a_snapshot_and_a_new_host_starts_from_it(tmp_path, redis_server):
    """compact_every = 4: after every 4 entries one host stores a snapshot and trims the
    stream; a host started afterwards reads the snapshot and the rest and ends with exactly
    the weights of the hosts that applied every event."""
    hosts = [Host(tmp_path, name, redis_server.url, compact_every=4, keep_stream=0) for name in ("mx1", "mx2")]
    try:
        for i in range(5):
            learn_new_messages(hosts[i % 2], 2, f"round {i}")
            wait_until(lambda: converged(hosts), timeout=5, what="both hosts converged")
        assert snapshot_position(redis_server)
        assert stream_length(redis_server) < 10  # trimmed: the snapshot holds the rest
        assert hosts[0].status()["applied"] == 10

        newcomer = Host(tmp_path, "mx3", redis_server.url, compact_every=4, keep_stream=0)
        hosts.append(newcomer)
        wait_until(lambda: converged(hosts), timeout=5, what="the new host converged")
        assert newcomer.status()["applied"] == 10 and newcomer.status()["snapshot"] == snapshot_position(redis_server)
        assert newcomer.model.weights == hosts[0].model.weights == hosts[1].model.weights
        assert newcomer.score(SPAM[0] + b"\nround 4 1\n") < 0.3
    finally:
        for host in hosts:
            host.cluster.stop()


def test_a_host_that_fell_behind_the_trimmed_stream_starts_over_from_the_snapshot(tmp_path, redis_server):
    """A host whose thread stops (a hung process) while the others learn enough for two
    snapshots, and learns one message of its own meanwhile: when it runs again it takes the
    snapshot (the entries it missed are gone), keeps its own learn, and converges."""
    a, b, c = (Host(tmp_path, name, redis_server.url, compact_every=3, keep_stream=0) for name in ("mx1", "mx2", "mx3"))
    try:
        learn_new_messages(a, 1, "before")
        wait_until(lambda: converged([a, b, c]), timeout=5, what="the first learn everywhere")
        c.cluster.stop()
        learn_new_messages(a, 4, "while c hangs")
        learn_new_messages(b, 4, "also while c hangs")
        c.cluster.learn(SPAM[2] + b"\nc's own\n", is_spam=False)  # waits in c's outbox
        wait_until(lambda: converged([a, b]) and stream_length(redis_server) < 9, timeout=5,
                   what="a and b converged and the stream trimmed")
        c.cluster.start()
        wait_until(lambda: converged([a, b, c]), timeout=5, what="c caught up")
        assert a.model.weights == b.model.weights == c.model.weights
        assert a.status()["applied"] == c.status()["applied"] == 10
        assert all(h.score(SPAM[2] + b"\nc's own\n") < 0.3 for h in (a, b, c))
    finally:
        for host in (a, b, c):
            host.cluster.stop()


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_milter", *argv], capture_output=True, text=True, timeout=60)


def test_the_command_lines_learn_reaches_every_host(tmp_path, redis_server, hosts):
    """`atlas-milter learn` with [cluster] and no --model: published for every host at once
    (no model file written); the same message again counts once; Redis down: one clear
    line, non-zero exit, nothing learned."""
    a, b, c = hosts
    a.cluster.learn(SPAM[0], is_spam=False)  # the stream has an entry the command line must catch up with
    wait_until(lambda: converged(hosts), timeout=5, what="the first learn everywhere")
    message = tmp_path / "missed.eml"
    message.write_bytes(SPAM[1])
    conf = tmp_path / "cli.toml"
    conf.write_text(f'[store]\ndb = "{tmp_path / "cli.db"}"\n[cluster]\nredis = "{redis_server.url}"\nhost = "admin"\n'
                    "[statsd]\nenabled = false\n")
    assert b.score(SPAM[1]) > 0.9
    done = run_cli("learn", "--ham", str(message), "--config", str(conf))
    assert done.returncode == 0, done.stderr
    assert "learned as ham for every host ([cluster])" in done.stdout
    wait_until(lambda: converged(hosts) and all(h.score(SPAM[1]) < 0.3 for h in hosts), timeout=5,
               what="the command line's learn on every host")
    assert stream_length(redis_server) == 2 and not list(tmp_path.glob("*.model.json*"))

    again = run_cli("learn", "--ham", str(message), "--config", str(conf))
    assert again.returncode == 0 and "already" in again.stdout and stream_length(redis_server) == 2

    redis_server.kill()
    down = run_cli("learn", "--spam", str(message), "--config", str(conf))
    assert down.returncode != 0 and "Traceback" not in down.stderr
    assert "unreachable" in down.stderr and "not learned" in down.stderr and len(down.stderr.strip().splitlines()) == 1


def test_on_a_redis_cluster_learning_is_shared_compacted_and_survives_the_node_going_away(tmp_path):
    """[cluster] redis_cluster = true against a real three-node Redis Cluster: every key is in
    the one slot of the {atlas} hash tag, so the scripts run; hosts learn from each other, the
    stream is folded into snapshots; with the node that holds the slot killed, learns wait in
    the outbox and arrive once after it returns; a host can start while the cluster is down."""
    import redis as redis_py

    from tests.support.servers import start_redis_cluster

    require_binary("redis-server")
    nodes = start_redis_cluster(private_tmpdir("atlas-rcluster-"))
    hosts = []
    try:
        url = nodes[0].url
        holder = redis_py.RedisCluster.from_url(url).get_node_from_key("{atlas}:learn")
        owner = next(n for n in nodes if n.port == holder.port)  # the node of the {atlas} slot

        def make(name: str) -> Host:
            hosts.append(Host(tmp_path, name, url, compact_every=3, keep_stream=0, redis_cluster=True))
            return hosts[-1]

        a, b = make("mx1"), make("mx2")
        learn_new_messages(a, 2, "on the cluster")
        learn_new_messages(b, 2, "also on the cluster")
        wait_until(lambda: converged(hosts), timeout=5, what="both hosts converged on the Redis Cluster")
        on_owner = redis_py.Redis(port=owner.port)
        assert on_owner.hget("{atlas}:snapshot", "position")  # compacted there, every key on that node
        assert on_owner.xlen("{atlas}:learn") < 4 and len(on_owner.keys("{atlas}:seen:*")) == 4

        owner.kill()
        a.cluster.learn(SPAM[0] + b"\nwhile the node is away\n", is_spam=False)
        wait_until(lambda: a.cluster.link.breaker.is_open, timeout=2, what="the breaker open")
        late = make("mx3")  # starts while the slot's node is down: no error, it waits
        assert a.status()["outbox"] == 1
        owner.start()
        wait_until(lambda: converged(hosts), timeout=20, what="every host converged after the node returned")
        assert a.model.weights == b.model.weights == late.model.weights
        assert late.score(SPAM[0] + b"\nwhile the node is away\n") < 0.3
        assert a.status()["applied"] == late.status()["applied"] == 5
    finally:
        for host in hosts:
            host.cluster.stop()
        for node in nodes:
            node.stop()
