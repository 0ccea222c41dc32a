"""The balancer's registration tokens: a file of one or more tokens (the
current one first, then previous ones still accepted during a rotation),
re-read when it changes, keeping the last good tokens when it goes bad.
Every change here is seen through an explicit refresh(), never a sleep."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from lbserver.errors import ConfigError
from lbserver.security import (
    MAX_TOKEN_FILE_BYTES,
    Authorizer,
    Denial,
    RegistrationTokens,
    load_token,
    load_tokens,
)
from tests.support.eventually import eventually

NEW = "new-token-2026"
OLD = "old-token-2025"
OLDER = "older-token-2024"


class SecretVolume:
    """A Secret mounted the way kubelet does it: `token -> ..data/token`,
    `..data -> ..<timestamp>`; an update writes a new timestamped directory,
    swaps `..data` atomically (a new symlink renamed over it) and removes
    the previous directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0
        self.token_file = root / "token"

    def write(self, text: str | bytes) -> None:
        self.versions += 1
        version = self.root / f"..2026_01_01_00_00_{self.versions:02d}"
        version.mkdir()
        content = text.encode() if isinstance(text, str) else text
        (version / "token").write_bytes(content)
        data = self.root / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        staged = self.root / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, data)
        if not self.token_file.is_symlink():
            self.token_file.symlink_to("..data/token")
        if previous is not None:
            shutil.rmtree(self.root / previous)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def events(logs: Iterable[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path)


# ---------------------------------------------------------------------------
# The file format


def test_a_file_holds_the_current_token_then_previous_ones(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n  {NEW}  \r\n\n{OLD}\n\t{OLDER}\n{OLD}\n\n")
    tokens = load_tokens("", str(path))
    assert tokens is not None
    assert tokens.tokens == (NEW, OLD, OLDER)
    assert tokens.path == str(path)
    assert load_token("", str(path)) == NEW


def test_auth_token_may_hold_tokens_on_separate_lines() -> None:
    tokens = load_tokens(f"{NEW}\n{OLD}\n", "")
    assert tokens is not None and tokens.tokens == (NEW, OLD)
    assert tokens.path is None
    assert not tokens.refresh()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("\n \n\t\n", "is empty or only whitespace"),
        (f"{NEW}\ntwo words\n", "line 2: character 4 is whitespace"),
        (f"bell\x07\n{OLD}\n", "line 1: character 5 is a control character"),
        (f"{NEW}\n\nt\u00f6ken\n", "line 3: character 2 is a non-ASCII character"),
    ],
)
def test_a_file_without_usable_tokens_is_a_config_error(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"auth_token_file: .*{path}") as raised:
        load_tokens("", str(path))
    assert problem in str(raised.value)
    assert NEW not in str(raised.value) and OLD not in str(raised.value)


def test_an_unreadable_or_huge_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth_token_file: cannot read"):
        load_tokens("", str(tmp_path / "missing"))
    huge = tmp_path / "huge"
    huge.write_text("a" * (MAX_TOKEN_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_tokens("", str(huge))


def test_a_bad_second_line_of_auth_token_names_the_line() -> None:
    with pytest.raises(ConfigError, match="auth_token, line 2: character 3") as raised:
        load_tokens(f"{NEW}\nab cd", "")
    assert NEW not in str(raised.value)


# ---------------------------------------------------------------------------
# Checking a call


def test_every_token_of_the_file_is_accepted_and_its_index_told(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{NEW}\n{OLD}\n")
    authorizer = Authorizer(RegistrationTokens.from_file(str(path)))
    assert authorizer.verify(bearer(NEW), {}) == 0
    assert authorizer.verify(bearer(OLD), {}) == 1
    assert authorizer.check(bearer(OLD), {}) is None
    for wrong in (OLDER, NEW + "x", NEW[:-1], ""):
        verdict = authorizer.verify(bearer(wrong), {})
        assert isinstance(verdict, Denial)
    verdict = authorizer.verify(bearer("wrong"), {})
    assert isinstance(verdict, Denial)
    assert verdict.code == grpc.StatusCode.PERMISSION_DENIED and verdict.reason == "wrong_token"


def test_a_single_string_token_still_works() -> None:
    authorizer = Authorizer(NEW)
    assert authorizer.verify(bearer(NEW), {}) == 0
    assert isinstance(authorizer.verify(bearer(OLD), {}), Denial)
    assert Authorizer().verify([], {}) == 0


def test_match_compares_every_token() -> None:
    tokens = RegistrationTokens([NEW, OLD, OLDER])
    assert [tokens.match(t.encode()) for t in (NEW, OLD, OLDER, "nope")] == [0, 1, 2, None]


# ---------------------------------------------------------------------------
# Reloading


def test_refresh_takes_changed_tokens_and_logs_their_number(volume: SecretVolume) -> None:
    volume.write(f"{NEW}\n")
    tokens = RegistrationTokens.from_file(str(volume.token_file))
    authorizer = Authorizer(tokens)
    with capture_logs() as logs:
        assert not tokens.refresh()  # unchanged
        assert events(logs, "registration tokens reloaded") == []
        volume.write(f"{OLDER}\n{NEW}\n")  # kubelet's atomic swap of ..data
        assert authorizer.generation == 0
        assert tokens.refresh()
    assert tokens.tokens == (OLDER, NEW)
    assert authorizer.generation == 1
    assert authorizer.verify(bearer(NEW), {}) == 1
    assert authorizer.verify(bearer(OLDER), {}) == 0
    [reloaded] = events(logs, "registration tokens reloaded")
    assert reloaded["tokens"] == 2 and reloaded["log_level"] == "info"
    assert NEW not in str(logs) and OLDER not in str(logs)


def test_a_removed_token_is_refused_after_the_refresh(volume: SecretVolume) -> None:
    volume.write(f"{NEW}\n{OLD}\n")
    tokens = RegistrationTokens.from_file(str(volume.token_file))
    authorizer = Authorizer(tokens)
    assert authorizer.verify(bearer(OLD), {}) == 1
    volume.write(f"{NEW}\n")
    assert authorizer.verify(bearer(OLD), {}) == 1  # not yet looked at
    assert tokens.refresh()
    assert isinstance(authorizer.verify(bearer(OLD), {}), Denial)
    assert authorizer.verify(bearer(NEW), {}) == 0


def test_a_file_rewritten_in_place_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(NEW)
    tokens = RegistrationTokens.from_file(str(path))
    path.write_text(f"{OLD}\n{NEW}\n")
    assert tokens.refresh()
    assert tokens.tokens == (OLD, NEW)


@pytest.mark.parametrize(
    "bad",
    ["", " \n\n", f"{NEW}\nhas space\n", b"\xff\xfe\n", "missing"],
    ids=["empty", "whitespace", "bad-token", "not-utf8", "missing"],
)
def test_a_bad_file_keeps_the_last_good_tokens_and_logs_one_error(
    volume: SecretVolume, bad: str | bytes
) -> None:
    volume.write(f"{NEW}\n{OLD}\n")
    tokens = RegistrationTokens.from_file(str(volume.token_file))
    with capture_logs() as logs:
        if bad == "missing":
            os.unlink(volume.token_file)
        else:
            volume.write(bad)
        for _ in range(3):
            assert not tokens.refresh()
        assert tokens.tokens == (NEW, OLD)
        assert Authorizer(tokens).verify(bearer(OLD), {}) == 1
        [error] = events(logs, "registration token file unusable; keeping the last good tokens")
        assert error["log_level"] == "error" and error["tokens"] == 2
        assert NEW not in str(logs) and OLD not in str(logs)
        # Good again, as before: one info line, no reload.
        if bad == "missing":
            volume.token_file.symlink_to("..data/token")
        volume.write(f"{NEW}\n{OLD}\n")
        assert not tokens.refresh()
        assert not tokens.refresh()
    assert len(events(logs, "registration token file usable again")) == 1
    assert events(logs, "registration tokens reloaded") == []
    assert tokens.generation == 0


def test_after_a_bad_spell_new_tokens_are_taken(volume: SecretVolume) -> None:
    volume.write(NEW)
    tokens = RegistrationTokens.from_file(str(volume.token_file))
    with capture_logs() as logs:
        volume.write("")
        assert not tokens.refresh()
        volume.write(f"{OLDER}\n{NEW}")
        assert tokens.refresh()
        volume.write("")
        assert not tokens.refresh()
    assert tokens.tokens == (OLDER, NEW)
    # One error per bad spell, not per check.
    unusable = "registration token file unusable; keeping the last good tokens"
    assert [entry["event"] for entry in logs] == [
        unusable,
        "registration tokens reloaded",
        unusable,
    ]


async def test_watch_refreshes_until_cancelled(volume: SecretVolume) -> None:
    volume.write(NEW)
    tokens = RegistrationTokens.from_file(str(volume.token_file))
    watching = asyncio.create_task(tokens.watch(every=0))
    try:
        volume.write(f"{OLD}\n{NEW}")
        await eventually(lambda: tokens.tokens == (OLD, NEW), "the new tokens", within=10)
    finally:
        watching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watching
    assert tokens.generation == 1
