"""Configuration: TOML + overrides + ENABLE_* flags + profiles, with one-line errors."""

import pytest

from atlas_milter.config import PROFILES, auto_profile, load_config
from atlas_milter.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "atlas.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    config = load_config(None, env={})
    assert config.features.caching and config.features.parallel
    assert config.classifier.max_bytes == 512 * 1024
    assert config.statsd.prefix == "atlas"


def test_file_values_and_cli_overrides(tmp_path):
    path = write(tmp_path, '[classifier]\nspam_cutoff = 0.8\n[store]\ndb = "a.db"\n')
    config = load_config(path, overrides={"store.db": "b.db", "classifier.ham_cutoff": None}, env={})
    assert config.classifier.spam_cutoff == 0.8
    assert config.store.db == "b.db"


def test_unknown_key_names_the_key(tmp_path):
    path = write(tmp_path, "[classifier]\nspam_cutof = 0.8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "spam_cutof" in str(err.value) and "\n" not in str(err.value)


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="spam_cutoff"):
        load_config(write(tmp_path, "[classifier]\nspam_cutoff = 2\n"), env={})
    with pytest.raises(ConfigError, match="workers"):
        load_config(write(tmp_path, '[performance]\nworkers = "four"\n'), env={})
    with pytest.raises(ConfigError, match="profile"):
        load_config(write(tmp_path, '[performance]\nprofile = "huge"\n'), env={})
    with pytest.raises(ConfigError, match=r"\[milter\] transport: 'milter' is not one of loop, libmilter"):
        load_config(write(tmp_path, '[milter]\ntransport = "milter"\n'), env={})


def test_not_toml_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[[[ nope"), env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", env={})


def test_enable_flags_from_environment():
    config = load_config(None, env={"ENABLE_CACHING": "false", "ENABLE_PARALLEL": "False", "ENABLE_MONITORING": "true"})
    assert not config.features.caching and not config.features.parallel and config.features.monitoring
    with pytest.raises(ConfigError, match="ENABLE_STREAMING"):
        load_config(None, env={"ENABLE_STREAMING": "maybe"})


@pytest.mark.parametrize("name", ["small", "medium", "large"])
def test_profiles_fill_workers_memory_and_batch(name):
    perf = load_config(None, overrides={"performance.profile": name}, env={}).performance.resolved()
    assert (perf.workers, perf.memory_limit_mb, perf.batch_size) == tuple(PROFILES[name].values())


def test_explicit_values_beat_the_profile():
    perf = load_config(None, overrides={"performance.profile": "large", "performance.workers": 3}, env={}).performance.resolved()
    assert perf.workers == 3 and perf.batch_size == 1000


def test_auto_profile_follows_the_machine():
    assert auto_profile(cpus=2, mem_mb=24000) == "small"
    assert auto_profile(cpus=4, mem_mb=8000) == "medium"
    assert auto_profile(cpus=16, mem_mb=64000) == "large"
    assert auto_profile(cpus=16, mem_mb=1000) == "small"


@pytest.mark.parametrize("cluster, fragment", [
    ('redis_cluster = true\nsentinels = ["10.0.0.1:26379"]', "redis_cluster = true needs redis"),
    ('redis = "redis://10.0.0.5:7000/0"\nredis_cluster = true\nmin_replicas = 1', "neither sentinels nor min_replicas"),
    ('redis = "redis://10.0.0.5:6379/0"\ncompact_every = 0', "compact_every must be 1 or more"),
    ('redis = "redis://10.0.0.5:6379/0"\nseen_days = 0', "seen_days positive"),
])
def test_cluster_settings_that_cannot_work_are_refused(tmp_path, cluster, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, f"[cluster]\n{cluster}\n"), env={})
    assert load_config(write(tmp_path, '[cluster]\nredis = "redis://10.0.0.5:7000/0"\nredis_cluster = true\n'),
                       env={}).cluster.redis_cluster
