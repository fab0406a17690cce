"""Unit tests for shared/config.py: defaults, precedence and validation of settings."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, cast

import pytest

from shared.config import (
    COMMON,
    GATEWAY,
    WORKER,
    Config,
    add_arguments,
    env_name,
    fields_for,
    flag_name,
    load_config,
)
from shared.errors import ConfigError

POSITIVE = [
    "session_ttl_s",
    "max_frame_bytes",
    "max_text_frame_bytes",
    "idle_timeout_s",
    "resume_grace_s",
    "max_session_audio_s",
    "audio_burst_s",
    "max_pending_frames",
    "ping_interval_s",
    "ping_timeout_s",
    "worker_alive_s",
    "reconcile_interval_s",
    "drain_timeout_s",
    "beam_size",
    "auto_slots_factor",
    "auto_slots_max",
    "interim_interval_s",
    "min_silence_s",
    "max_utterance_s",
    "lease_s",
    "heartbeat_s",
    "read_block_ms",
    "takeover_interval_s",
    "max_session_attempts",
    "maintenance_interval_s",
]


def config_error(**values: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Config(**values)  # type: ignore[arg-type]
    return info.value


def names_both(err: ConfigError, field: str) -> bool:
    text = str(err)
    return flag_name(field) in text and env_name(field) in text


def test_defaults_are_valid() -> None:
    """Config() with no arguments passes its own validation, and load_config({}, {}) equals it."""
    assert load_config({}, {}) == Config()


def test_documented_defaults() -> None:
    """A few defaults that protocol.md and the docs promise."""
    cfg = Config()
    assert cfg.max_frame_bytes == 65536
    assert cfg.idle_timeout_s == 30.0
    assert cfg.resume_grace_s == 60.0
    assert cfg.api_keys == ()
    assert cfg.redis_url is None


def test_config_is_frozen() -> None:
    """A Config cannot be changed after it is built."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().slots = 2  # type: ignore[misc]


def test_environment_beats_default() -> None:
    """STREAMSCRIBE_<NAME> overrides the default and is converted to the field's type."""
    cfg = load_config({}, {"STREAMSCRIBE_SLOTS": "3", "STREAMSCRIBE_IDLE_TIMEOUT_S": "2.5"})
    assert cfg.slots == 3
    assert cfg.idle_timeout_s == 2.5


def test_flag_beats_environment() -> None:
    """A flag value wins over the environment variable of the same setting."""
    cfg = load_config({"slots": "4"}, {"STREAMSCRIBE_SLOTS": "3"})
    assert cfg.slots == 4


def test_flag_set_to_none_falls_back_to_environment() -> None:
    """A flag left as None does not hide the environment variable."""
    assert load_config({"slots": None}, {"STREAMSCRIBE_SLOTS": "3"}).slots == 3


def test_precedence_through_argparse() -> None:
    """Flags parsed by add_arguments beat the environment; unset flags leave it in force."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, COMMON, GATEWAY, WORKER)
    args = parser.parse_args(["--slots", "5", "--api-key", "a", "--api-key", "b"])
    env = {"STREAMSCRIBE_SLOTS": "3", "STREAMSCRIBE_PORT": "9000"}
    cfg = load_config(args, env)
    assert (cfg.slots, cfg.port, cfg.api_keys) == (5, 9000, ("a", "b"))


def test_unset_flags_stay_out_of_the_namespace() -> None:
    """add_arguments does not put defaults into the namespace (so the environment can win)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, GATEWAY)
    assert vars(parser.parse_args([])) == {}


def test_parts_select_flags() -> None:
    """Gateway flags exclude worker-only settings and vice versa; common ones are in both."""
    gateway = {f.name for f in fields_for(GATEWAY, COMMON)}
    worker = {f.name for f in fields_for(WORKER, COMMON)}
    assert "max_frame_bytes" in gateway and "max_frame_bytes" not in worker
    assert "beam_size" in worker and "beam_size" not in gateway
    assert "redis_url" in gateway & worker


def test_os_environ_is_read_when_no_environ_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config reads os.environ when it is not handed an environment."""
    monkeypatch.setenv("STREAMSCRIBE_SLOTS", "6")
    assert load_config().slots == 6


def test_flag_and_env_names() -> None:
    """Flag and environment names follow the field name; api_keys is the singular --api-key."""
    assert flag_name("idle_timeout_s") == "--idle-timeout-s"
    assert env_name("idle_timeout_s") == "STREAMSCRIBE_IDLE_TIMEOUT_S"
    assert flag_name("api_keys") == "--api-key"


@pytest.mark.parametrize("field", POSITIVE)
@pytest.mark.parametrize("value", [0, -1])
def test_positive_limits_reject_zero_and_negatives(field: str, value: int) -> None:
    """Every positive-number limit rejects 0 and -1 with an error naming flag and variable."""
    err = config_error(**{field: value})
    assert names_both(err, field)
    assert "positive" in str(err)


@pytest.mark.parametrize("field", POSITIVE)
def test_positive_limit_from_environment_rejects_zero(field: str) -> None:
    """A 0 in the environment is rejected with the variable's name in the message."""
    with pytest.raises(ConfigError) as info:
        load_config({}, {env_name(field): "0"})
    assert names_both(info.value, field)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_positive_limits_reject_nan_and_infinity(value: float) -> None:
    """NaN and infinity are not accepted as limits."""
    assert names_both(config_error(idle_timeout_s=value), "idle_timeout_s")


@pytest.mark.parametrize("raw", ["abc", "1.5", ""])
def test_unreadable_int_is_rejected_naming_both(raw: str) -> None:
    """A value that does not convert to the field's type is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load_config({}, {"STREAMSCRIBE_SLOTS": raw})
    assert names_both(info.value, "slots")
    assert repr(raw) in str(info.value)


def test_unreadable_float_is_rejected() -> None:
    """A float setting that is not a number is a ConfigError."""
    with pytest.raises(ConfigError):
        load_config({"idle_timeout_s": "soon"}, {})


def test_api_keys_from_comma_separated_environment() -> None:
    """STREAMSCRIBE_API_KEYS is split on commas, trimmed, blanks dropped."""
    cfg = load_config({}, {"STREAMSCRIBE_API_KEYS": " k1, k2,,k3 ,"})
    assert cfg.api_keys == ("k1", "k2", "k3")


def test_api_keys_from_a_list() -> None:
    """A list of keys (repeated flag) becomes a tuple, commas not split."""
    cfg = load_config({"api_keys": ["a,b", "c"]}, {"STREAMSCRIBE_API_KEYS": "x"})
    assert cfg.api_keys == ("a,b", "c")


def test_empty_api_keys_means_no_keys() -> None:
    """An empty STREAMSCRIBE_API_KEYS configures no keys."""
    assert load_config({}, {"STREAMSCRIBE_API_KEYS": ""}).api_keys == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", "gpu"),
        ("engine", "vosk"),
        ("log_level", "TRACE"),
        ("log_level", "debug"),
        ("maintenance", "yes"),
    ],
)
def test_invalid_choices_are_rejected(field: str, value: str) -> None:
    """device, engine and log_level accept only their listed values (Config is case-exact)."""
    err = config_error(**{field: value})
    assert names_both(err, field)
    assert "one of" in str(err)


def test_log_level_from_environment_is_upper_cased() -> None:
    """The environment may spell the log level in lower case."""
    assert load_config({}, {"STREAMSCRIBE_LOG_LEVEL": "debug"}).log_level == "DEBUG"


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda"])
def test_valid_devices(value: str) -> None:
    """Each documented device value is accepted."""
    assert Config(device=value).device == value


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_out_of_range_is_rejected(port: int) -> None:
    """Ports outside 0..65535 are rejected naming --port / STREAMSCRIBE_PORT."""
    assert names_both(config_error(port=port), "port")


@pytest.mark.parametrize("port", [0, 65535])
def test_port_edges_are_accepted(port: int) -> None:
    """Port 0 (any free port) and 65535 are valid."""
    assert Config(port=port).port == port


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_vad_threshold_must_be_strictly_between_0_and_1(value: float) -> None:
    """vad_threshold of 0, 1 or outside is rejected."""
    assert names_both(config_error(vad_threshold=value), "vad_threshold")


def test_speech_pad_may_be_zero_but_not_negative() -> None:
    """speech_pad_s accepts 0 and rejects negatives."""
    assert Config(speech_pad_s=0.0).speech_pad_s == 0.0
    assert names_both(config_error(speech_pad_s=-0.01), "speech_pad_s")


def test_speech_pad_rejects_nan() -> None:
    """speech_pad_s=nan (e.g. STREAMSCRIBE_SPEECH_PAD_S=nan) is a ConfigError."""
    config_error(speech_pad_s=float("nan"))


def test_cpu_threads_may_be_zero_but_not_negative() -> None:
    """cpu_threads 0 means all cores; negatives are rejected."""
    assert Config(cpu_threads=0).cpu_threads == 0
    assert names_both(config_error(cpu_threads=-1), "cpu_threads")


def test_up_workers_at_their_edges() -> None:
    """workers (how many worker processes `up` starts): 1 and 64 are taken, 0 and 65 not;
    only `up` offers the flag, and `up --workers 3` reads it."""
    from shared.cli import build_parser

    assert Config(workers=1).workers == 1 and Config(workers=64).workers == 64
    for bad in (0, 65):
        assert names_both(config_error(workers=bad), "workers")
    parser = build_parser()
    assert load_config(parser.parse_args(["up", "--workers", "3"])).workers == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--workers", "3"])


@pytest.mark.parametrize(
    ("cpu_threads", "workers", "decode_threads", "cores", "expected"),
    [
        (0, 2, 2, 16, 4),  # 16 cores, 4 decodes at once in all
        (0, 2, 1, 2, 1),
        (0, 3, 2, 2, 1),  # more decodes than cores: still one thread each
        (0, 1, 2, 2, 1),
        (5, 4, 2, 2, 5),  # set by hand: kept
    ],
)
def test_up_shares_the_cores_out_among_its_workers(
    cpu_threads: int, workers: int, decode_threads: int, cores: int, expected: int
) -> None:
    from shared.cli import worker_cpu_threads

    config = Config(cpu_threads=cpu_threads, workers=workers, decode_threads=decode_threads)
    assert worker_cpu_threads(config, cores) == expected


@pytest.mark.parametrize("field", ["prompt_chars", "read_interval_ms"])
def test_zero_to_a_thousand_options_at_their_edges(field: str) -> None:
    """prompt_chars and read_interval_ms: 0 (off) and 1000 are taken; -1 and 1001 are not."""
    assert getattr(Config(**cast(dict[str, Any], {field: 0})), field) == 0
    assert getattr(Config(**cast(dict[str, Any], {field: 1000})), field) == 1000
    assert names_both(config_error(**{field: -1}), field)
    assert names_both(config_error(**{field: 1001}), field)


def test_read_streams_per_s_is_off_or_at_least_a_thousand() -> None:
    """read_streams_per_s: 0 (no limit) and 1000 are taken; 999 and -1 are not."""
    assert Config().read_streams_per_s == 3_000
    assert Config(read_streams_per_s=0).read_streams_per_s == 0
    assert Config(read_streams_per_s=1000).read_streams_per_s == 1000
    for bad in (999, 1, -1):
        assert names_both(config_error(read_streams_per_s=bad), "read_streams_per_s")


def test_read_chunk_streams_is_one_to_ten_thousand() -> None:
    """read_chunk_streams: 1 and 10,000 are taken; 0 and 10,001 are not."""
    assert Config().read_chunk_streams == 100
    assert Config(read_chunk_streams=1).read_chunk_streams == 1
    assert Config(read_chunk_streams=10_000).read_chunk_streams == 10_000
    for bad in (0, 10_001, -1):
        assert names_both(config_error(read_chunk_streams=bad), "read_chunk_streams")


def test_max_audio_rate_is_off_or_at_least_real_time() -> None:
    """max_audio_rate: 0 (no limit, the default) and 1.0 are taken; 0.99, -1, inf are not."""
    assert Config().max_audio_rate == 0
    assert Config(max_audio_rate=1.0).max_audio_rate == 1.0
    for bad in (0.99, -1.0, float("inf"), float("nan")):
        assert names_both(config_error(max_audio_rate=bad), "max_audio_rate")


def test_max_utterance_is_capped_at_whisper_window() -> None:
    """max_utterance_s accepts 28 and rejects anything longer."""
    assert Config(max_utterance_s=28.0).max_utterance_s == 28.0
    assert names_both(config_error(max_utterance_s=28.5), "max_utterance_s")


def test_heartbeat_must_be_at_most_half_the_lease() -> None:
    """heartbeat_s > lease_s / 2 is rejected naming both settings; exactly half is fine."""
    assert Config(lease_s=10.0, heartbeat_s=5.0).heartbeat_s == 5.0
    err = config_error(lease_s=10.0, heartbeat_s=5.5)
    assert names_both(err, "heartbeat_s") and names_both(err, "lease_s")


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h", "unix:///tmp/r.sock"])
def test_redis_url_schemes_accepted(url: str) -> None:
    """redis://, rediss:// and unix:// URLs are accepted."""
    assert Config(redis_url=url).require_redis_url() == url


@pytest.mark.parametrize("url", ["http://h", "h:6379", ""])
def test_other_redis_urls_rejected(url: str) -> None:
    """URLs of other schemes are rejected naming the setting."""
    assert names_both(config_error(redis_url=url), "redis_url")


def test_require_redis_url_names_the_setting() -> None:
    """Commands that need Redis fail with an error naming --redis-url / STREAMSCRIBE_REDIS_URL."""
    with pytest.raises(ConfigError) as info:
        Config().require_redis_url()
    assert names_both(info.value, "redis_url")


@pytest.mark.parametrize(
    ("certfile", "enabled"),
    [(None, False), ("none", False), ("NONE", False), ("/etc/ss/cert.pem", True)],
)
def test_tls_enabled_follows_certfile(certfile: str | None, enabled: bool) -> None:
    """TLS is on only when certfile is a path: None and 'none' (any case) mean plain ws://."""
    assert Config(certfile=certfile).tls_enabled is enabled


def test_certfile_none_from_environment_disables_tls() -> None:
    """STREAMSCRIBE_CERTFILE=none yields a plain ws:// gateway."""
    assert not load_config({}, {"STREAMSCRIBE_CERTFILE": "none"}).tls_enabled


def test_unrelated_environment_is_ignored() -> None:
    """Variables without the STREAMSCRIBE_ prefix or naming no setting change nothing."""
    assert load_config({}, {"SLOTS": "0", "STREAMSCRIBE_NOT_A_SETTING": "x"}) == Config()


@pytest.mark.parametrize("seconds", [7, 45, 61])
def test_maintenance_interval_must_divide_a_minute(seconds: int) -> None:
    """arq cron ticks on seconds of the minute: the interval must divide 60."""
    err = config_error(maintenance_interval_s=seconds)
    assert names_both(err, "maintenance_interval_s") and "divide 60" in str(err)


@pytest.mark.parametrize("seconds", [1, 5, 15, 30, 60])
def test_maintenance_intervals_that_divide_a_minute_are_accepted(seconds: int) -> None:
    """Every divisor of 60 is a valid maintenance interval."""
    assert Config(maintenance_interval_s=seconds).maintenance_interval_s == seconds


@pytest.mark.parametrize("command", ["up", "gateway", "worker", "transcribe", "status", "loadtest"])
def test_every_commands_help_renders_and_lists_its_settings(command: str) -> None:
    """`streamscribe COMMAND --help` prints (argparse %-formats help texts: a bare % in a
    setting's help once made `worker --help` crash), and shows every setting's help."""
    from shared.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        command
    ]
    text = sub.format_help()
    assert f"usage: streamscribe {command}" in text
    for action in sub._actions:
        if action.dest in {f.name for f in dataclasses.fields(Config)}:
            assert action.option_strings[0] in text
    if command in ("up", "worker"):
        assert "13% of the decode time" in " ".join(text.split())  # the % is shown as is


def test_every_setting_has_its_row_in_configuration_md() -> None:
    """docs/configuration.md's table has one row per Config field, with its flag and its
    environment variable, so the docs cannot fall behind a new setting."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| `")}
    for f in dataclasses.fields(Config):
        row = rows.get(f"`{f.name}`")
        assert row is not None, f"{f.name} has no row in docs/configuration.md"
        assert env_name(f.name) in row, f"{f.name}: its row lacks {env_name(f.name)}"
