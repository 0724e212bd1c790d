"""TAP_* settings: Tap's names, defaults and Go parsing rules; every bad value reported."""

from __future__ import annotations

import pytest

from config import SETTINGS, Config, ConfigError, load_config, parse_bool, parse_duration


def test_defaults_match_tap():
    cfg = load_config({}, dotenv=None)
    assert cfg.bind == ("0.0.0.0", 2480)
    assert cfg.plc_url == "https://plc.directory"
    assert cfg.relay_url == "https://relay1.us-east.bsky.network"
    assert cfg.firehose_url == "wss://relay1.us-east.bsky.network/xrpc/com.atproto.sync.subscribeRepos"
    assert (cfg.resync_parallelism, cfg.outbox_capacity, cfg.ident_cache_size) == (5, 100_000, 2_000_000)
    assert (cfg.retry_timeout, cfg.repo_fetch_timeout, cfg.cursor_save_interval) == (60.0, 300.0, 1.0)
    assert cfg.delivery_mode == "ack" and cfg.collection_filters == ()
    assert cfg == Config(**{**cfg.__dict__})


@pytest.mark.parametrize("text,seconds", [("60s", 60), ("1m", 60), ("1h30m", 5400), ("1.5s", 1.5), ("250ms", 0.25),
                                          ("0", 0), ("-5s", -5), ("2h3m4s", 7384)])
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "1d", "s", "1m x"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_go_bools():
    for t in ("1", "t", "T", "true", "TRUE", "True"):
        assert parse_bool(t) is True
    for f in ("0", "f", "F", "false", "FALSE", "False"):
        assert parse_bool(f) is False
    with pytest.raises(ValueError):
        parse_bool("yes")


def test_alias_names_and_order():
    assert load_config({"ATP_PLC_HOST": "http://plc.local"}, dotenv=None).plc_url == "http://plc.local"
    both = load_config({"TAP_PLC_URL": "http://a", "ATP_PLC_HOST": "http://b"}, dotenv=None)
    assert both.plc_url == "http://a"
    assert load_config({"RELAY_IDENT_CACHE_SIZE": "7"}, dotenv=None).ident_cache_size == 7
    assert load_config({"LOG_LEVEL": "bogus"}, dotenv=None).log_level == "info"


def test_dotenv_file_is_read_and_env_wins(tmp_path):
    f = tmp_path / ".env"
    f.write_text("TAP_BIND=:9999\nTAP_OUTBOX_CAPACITY=5\n")
    cfg = load_config({"TAP_OUTBOX_CAPACITY": "6"}, dotenv=f)
    assert cfg.bind == ("0.0.0.0", 9999) and cfg.outbox_capacity == 6


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config({"TAP_RELAY_URL": "relay", "TAP_OUTBOX_CAPACITY": "many", "TAP_BIND": "nowhere",
                     "TAP_DISABLE_ACKS": "maybe"}, dotenv=None)
    msg = str(e.value)
    for name in ("TAP_RELAY_URL", "TAP_OUTBOX_CAPACITY", "TAP_BIND", "TAP_DISABLE_ACKS"):
        assert name in msg


@pytest.mark.parametrize("env,needle", [
    ({"TAP_NO_REPLAY": "true", "TAP_FULL_NETWORK": "true"}, "TAP_NO_REPLAY cannot be combined"),
    ({"TAP_DATABASE_URL": "mysql://x"}, "TAP_DATABASE_URL"),
    ({"TAP_SIGNAL_COLLECTION": "not an nsid"}, "TAP_SIGNAL_COLLECTION"),
    ({"TAP_KAFKA_ONLY": "true"}, "TAP_KAFKA_ONLY needs TAP_KAFKA_BOOTSTRAP"),
    ({"TAP_WEBHOOK_URL": "ftp://hook"}, "TAP_WEBHOOK_URL"),
    ({"TAP_SHARDS": "0"}, "TAP_SHARDS"),
])
def test_cross_checks(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(env, dotenv=None)


def test_repo_fetch_timeout_nonpositive_is_30s():
    assert load_config({"TAP_REPO_FETCH_TIMEOUT": "0s"}, dotenv=None).repo_fetch_timeout == 30.0


def test_kafka_passthrough_and_modes():
    cfg = load_config({"TAP_KAFKA_BOOTSTRAP": "b:9092", "TAP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                       "TAP_KAFKA_SASL_USERNAME": "u", "TAP_KAFKA_ONLY": "1"}, dotenv=None)
    assert dict(cfg.kafka_extra) == {"security.protocol": "SASL_SSL", "sasl.username": "u"}
    assert cfg.delivery_mode == "kafka-only"
    assert load_config({"TAP_WEBHOOK_URL": "http://h", "TAP_DISABLE_ACKS": "1"}, dotenv=None).delivery_mode == "webhook"


def test_every_setting_has_help_and_parses_its_default():
    for s in SETTINGS:
        assert s.help and s.env
    load_config({}, dotenv=None)


def test_live_verify_setting(monkeypatch):
    """TAP_LIVE_VERIFY: pool/inline are obeyed; auto follows the CPU count; bad values refused."""
    import config
    from config import ConfigError, load_config

    assert load_config({"TAP_LIVE_VERIFY": "pool"}).live_verify_in_pool
    assert not load_config({"TAP_LIVE_VERIFY": "inline"}).live_verify_in_pool
    assert not load_config({"TAP_LIVE_VERIFY": "pool", "TAP_VERIFY_WORKERS": "0"}).live_verify_in_pool
    for cpus, in_pool in ((1, False), (2, True), (8, True), (None, False)):  # auto: the pool from 2 CPUs
        monkeypatch.setattr(config.os, "cpu_count", lambda: cpus)
        assert load_config({}).live_verify_in_pool is in_pool, cpus
        assert not load_config({"TAP_VERIFY_WORKERS": "0"}).live_verify_in_pool
    with pytest.raises(ConfigError, match="TAP_LIVE_VERIFY"):
        load_config({"TAP_LIVE_VERIFY": "sometimes"})
