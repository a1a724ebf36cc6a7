"""graft.tokens: the token file both servers read, and the constant-time match."""

from __future__ import annotations

import pytest

from graft import tokens
from serving.runtime import auth


def test_graft_serve_and_the_console_read_the_file_by_one_rule(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n" + "a" * 16 + "\n" + "b" * 20 + "==\n")
    assert tokens.read_token_file(path) == ("a" * 16, "b" * 20 + "==")
    assert auth.read_token_file is tokens.read_token_file and auth.parse_tokens is tokens.parse_tokens


@pytest.mark.parametrize("text, message", [("", "no token"), ("short\n", "shorter than 16"),
                                           ("has space in it 0123\n", "only letters")])
def test_bad_token_files_are_refused(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        tokens.read_token_file(path)


def test_matches_any_listed_token_and_nothing_else():
    listed = ("a" * 16, "b" * 16)
    assert tokens.matches("b" * 16, listed)
    assert not tokens.matches("b" * 15, listed)
    assert not tokens.matches("", listed)
    assert not tokens.matches("é" * 16, listed)
