"""Unit tests for shared/keys.py: the Redis key layout."""

from __future__ import annotations

import pytest

from shared import keys
from shared.keys import SessionId, WorkerId

SID = SessionId("0123456789abcdef0123456789abcdef")
OTHER = SessionId("f" * 32)

PER_SESSION = [keys.meta, keys.audio, keys.results, keys.lease, keys.events_channel]


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first '{' and the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start)]


@pytest.mark.parametrize("make", PER_SESSION, ids=lambda f: f.__name__)
def test_per_session_key_carries_the_session_hash_tag(make: object) -> None:
    """Every per-session key and channel has hash tag {session_id} under the ss: prefix."""
    key = make(SID)  # type: ignore[operator]
    assert key.startswith("ss:{")
    assert hash_tag(key) == SID


def test_per_session_keys_are_distinct() -> None:
    """The five per-session names never collide with each other."""
    names = [make(SID) for make in PER_SESSION]
    assert len(set(names)) == len(names)


def test_different_sessions_get_different_keys() -> None:
    """Keys of two sessions differ (no shared state between sessions)."""
    assert {make(SID) for make in PER_SESSION}.isdisjoint({make(OTHER) for make in PER_SESSION})


def test_session_keys_are_the_four_that_expire_together() -> None:
    """session_keys returns meta, audio, results and lease, all in one slot."""
    assert keys.session_keys(SID) == (
        keys.meta(SID),
        keys.audio(SID),
        keys.results(SID),
        keys.lease(SID),
    )
    assert {hash_tag(k) for k in keys.session_keys(SID)} == {SID}


def test_fleet_keys_have_no_session_hash_tag() -> None:
    """Fleet-wide keys carry no {...} tag and parse to no session."""
    for key in (keys.DISPATCH, keys.WORKERS, keys.DETACHED, keys.worker_info(WorkerId("w-1"))):
        assert key.startswith("ss:")
        assert "{" not in key
        assert keys.parse_session_from_key(key) is None


@pytest.mark.parametrize("make", PER_SESSION, ids=lambda f: f.__name__)
def test_parse_session_from_key_inverts_every_per_session_key(make: object) -> None:
    """parse_session_from_key gives back the session ID of each per-session key."""
    assert keys.parse_session_from_key(make(SID)) == SID  # type: ignore[operator]


@pytest.mark.parametrize(
    "key",
    [
        "",
        f"ss:{SID}:meta",  # no hash tag
        f"xx:{{{SID}}}:meta",  # other prefix
        f"ss:{{{SID.upper()}}}:meta",
        f"ss:{{{SID[:-1]}}}:meta",
        f"ss:{{{SID}0}}:meta",
        f"ss:{{{SID}}}",  # nothing after the tag
        f"prefix-ss:{{{SID}}}:meta",
    ],
)
def test_parse_session_from_key_rejects_other_keys(key: str) -> None:
    """Keys without a well-formed ss:{<32 hex>}: head parse to None."""
    assert keys.parse_session_from_key(key) is None


def test_is_session_id_accepts_32_lowercase_hex() -> None:
    """A 32-character lowercase hex string is a session ID."""
    assert keys.is_session_id(SID)
    assert keys.is_session_id("0" * 32)


@pytest.mark.parametrize(
    "value", ["", SID[:-1], SID + "a", SID.upper(), SID[:-1] + "g", " " + SID, SID + " "]
)
def test_is_session_id_rejects_other_strings(value: str) -> None:
    """Wrong length, upper case, non-hex or padded strings are not session IDs."""
    assert not keys.is_session_id(value)


def test_is_session_id_rejects_trailing_newline() -> None:
    """A session ID followed by a newline is not a session ID."""
    assert not keys.is_session_id(SID + "\n")


def test_worker_info_names_the_worker() -> None:
    """worker_info puts the worker ID in the key."""
    assert keys.worker_info(WorkerId("host-42")) == "ss:worker:host-42"


@pytest.mark.parametrize(
    ("role", "process_id", "name"),
    [
        ("gateway", "vm-2049-6b8cfe", "ss-gateway:vm-2049-6b8cfe"),
        ("worker", "gpu box 1", "ss-worker:gpu_box_1"),  # Redis refuses spaces in names
        ("worker", "wörker\n", "ss-worker:w_rker_"),
        ("status", "", "ss-status"),
    ],
)
def test_client_name_is_role_and_id_in_printable_ascii(
    role: str, process_id: str, name: str
) -> None:
    assert keys.client_name(role, process_id) == name
