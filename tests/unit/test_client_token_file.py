"""The token file reader shared by `lbserver register` and `lbserver status`:
one token per line, re-read when it changes (kubelet's atomic `..data`
symlink swap included), last good tokens kept when it goes bad."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lbserver.cli import main
from lbserver.cli._credentials import TokenFile, parse_tokens, token_source


class Clock:
    """A hand-driven monotonic clock: no test here waits for real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SecretVolume:
    """A Secret volume as kubelet writes it: `token -> ..data/token`,
    `..data -> ..<timestamp>/`; an update writes a new timestamped directory,
    swaps `..data` by renaming a new symlink over it, then removes the old
    directory."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.version = 0
        self.current: Path | None = None
        self.update(text)
        (root / "token").symlink_to("..data/token")

    @property
    def token_file(self) -> Path:
        return self.root / "token"

    def update(self, text: str) -> None:
        self.version += 1
        directory = self.root / f"..2026_01_{self.version:02d}"
        directory.mkdir()
        (directory / "token").write_text(text)
        staged = self.root / "..data_tmp"
        staged.symlink_to(directory.name)
        os.replace(staged, self.root / "..data")
        if self.current is not None:
            (self.current / "token").unlink()
            self.current.rmdir()
        self.current = directory


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("abc\n", ("abc",)),
        ("abc", ("abc",)),
        ("new\nold\n", ("new", "old")),
        ("\n  new  \n\n\told\r\n\n", ("new", "old")),
        ("a\nb\na\n", ("a", "b")),
    ],
)
def test_one_token_per_line(text: str, tokens: tuple[str, ...]) -> None:
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no token"),
        (" \n\t\n", "no token"),
        ("good\nsecret two\n", "line 2: character 7"),
        ("caf\u00e9\n", "line 1: character 4"),
    ],
)
def test_not_a_token_file(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_tokens(text)
    assert "secret" not in str(error.value)  # the message never shows a token


def test_reads_the_file_at_start(tmp_path: Path) -> None:
    tokens = TokenFile(write(tmp_path / "token", "new\nold\n"))
    assert tokens() == ("new", "old")
    assert tokens.tokens == ("new", "old")
    assert tokens.path == str(tmp_path / "token")


@pytest.mark.parametrize("text", [None, "", "\n \n"])
def test_unusable_at_start_is_an_error_naming_the_file(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "token"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        TokenFile(path)


def test_looks_again_at_most_every_check_interval(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "token", "one\n")
    tokens = TokenFile(path, check_every=1.0, clock=clock)
    path.write_text("two\n")
    clock.now += 0.5
    assert tokens() == ("one",)
    clock.now += 0.5
    assert tokens() == ("two",)


def test_sees_kubelets_atomic_symlink_swap(tmp_path: Path) -> None:
    clock = Clock()
    volume = SecretVolume(tmp_path, "old\n")
    tokens = TokenFile(volume.token_file, clock=clock)
    assert tokens() == ("old",)
    volume.update("new\nold\n")  # the rotation starts
    clock.now += 1
    assert tokens() == ("new", "old")
    volume.update("new\n")  # and ends
    clock.now += 1
    assert tokens() == ("new",)


def test_keeps_the_last_good_tokens_and_warns_once(tmp_path: Path) -> None:
    clock = Clock()
    volume = SecretVolume(tmp_path, "new\nold\n")
    tokens = TokenFile(volume.token_file, clock=clock)
    with capture_logs() as logs:
        (tmp_path / "..data").unlink()  # the target is gone: unreadable
        for _ in range(3):
            clock.now += 1
            assert tokens() == ("new", "old")
        volume.update("\n")  # readable, but empty
        for _ in range(3):
            clock.now += 1
            assert tokens() == ("new", "old")
        volume.update("newer\n")
        clock.now += 1
        assert tokens() == ("newer",)
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["path"] == str(volume.token_file)
    assert "cannot read" in warnings[0]["error"]
    assert [entry["event"] for entry in logs if entry["log_level"] == "info"] == [
        "token file usable again",
        "token file changed",
    ]
    assert "newer" not in str(logs)  # tokens are counted, never logged


def test_an_unchanged_file_is_not_announced(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "token", "one\n")
    tokens = TokenFile(path, clock=clock)
    with capture_logs() as logs:
        for _ in range(3):
            clock.now += 1
            assert tokens() == ("one",)
        path.write_text("one\n\n")  # a different file, the same tokens
        clock.now += 1
        assert tokens() == ("one",)
    assert logs == []


def test_token_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBSERVER_TOKEN", "from-the-environment")
    assert token_source(None) == "from-the-environment"
    source = token_source(str(write(tmp_path / "token", "a\nb\n")))
    assert isinstance(source, TokenFile) and source() == ("a", "b")
    monkeypatch.delenv("LBSERVER_TOKEN")
    assert token_source(None) is None
    with pytest.raises(ValueError, match=f"^--token-file: .*{tmp_path / 'missing'}"):
        token_source(str(tmp_path / "missing"))


def register_argv(token_file: Path) -> list[str]:
    return [
        *("register", "--service", "oap", "--backend", "10.0.0.7:11800"),
        *("--balancer", "127.0.0.1:1", "--token-file", str(token_file)),
    ]


@pytest.mark.parametrize("command", ["register", "status"])
@pytest.mark.parametrize("text", [None, " \n"])
def test_unusable_token_file_at_start_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, text: str | None
) -> None:
    path = tmp_path / "token"
    if text is not None:
        path.write_text(text)
    argv = register_argv(path) if command == "register" else ["status", "--token-file", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--token-file" in err and str(path) in err


@pytest.mark.parametrize("command", ["register", "status"])
def test_help_documents_the_format_and_rotation(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "one per line",
        "The first token is the current one",
        "asked again at once with the next token",
        "re-read when it changes",
        "last good tokens are kept",
        "exit 2",
        "LBSERVER_TOKEN",
    ):
        assert phrase in text, phrase
