"""`ckptkit.hub.credentials`: Kaggle credentials found where kagglehub and kagglesdk look, in their
order, without ever showing the secret."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ckptkit.hub.credentials import find_kaggle_credentials, in_colab, look_up_kaggle_credentials
from ckptkit.errors import FormatError


def test_nothing_set_means_no_credentials(tmp_path: Path) -> None:
    assert find_kaggle_credentials({}, home=tmp_path) is None


def test_api_token_wins_over_everything(tmp_path: Path) -> None:
    env = {"KAGGLE_API_TOKEN": "tok", "KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}
    creds = find_kaggle_credentials(env, home=tmp_path)
    assert creds is not None and creds.origin == "KAGGLE_API_TOKEN"
    assert creds.headers() == {"Authorization": "Bearer tok"}
    assert "tok" not in repr(creds)


def test_api_token_may_name_a_file_and_an_empty_one_is_skipped(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  from-file\n")
    assert find_kaggle_credentials({"KAGGLE_API_TOKEN": str(token)},
                                   home=tmp_path).token == "from-file"  # type: ignore[union-attr]
    token.write_text("")
    assert find_kaggle_credentials({"KAGGLE_API_TOKEN": str(token)}, home=tmp_path) is None


def test_access_token_file_in_home(tmp_path: Path) -> None:
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "access_token.txt").write_text("t\n")
    creds = find_kaggle_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=tmp_path)
    assert creds is not None and creds.origin == "~/.kaggle/access_token.txt"


def test_username_and_key_then_kaggle_json(tmp_path: Path) -> None:
    creds = find_kaggle_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=tmp_path)
    assert creds is not None and creds.origin == "KAGGLE_USERNAME/KAGGLE_KEY"
    assert creds.headers()["Authorization"] == "Basic " + base64.b64encode(b"u:k").decode()
    assert find_kaggle_credentials({"KAGGLE_USERNAME": "u"}, home=tmp_path) is None
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"username": "me", "key": "secret"}))
    creds = find_kaggle_credentials({"KAGGLE_CONFIG_DIR": str(config)}, home=tmp_path)
    assert creds is not None and creds.origin == str(config / "kaggle.json")
    assert creds.username == "me" and "secret" not in repr(creds)


def test_a_broken_kaggle_json_is_an_error_as_in_kagglehub(tmp_path: Path) -> None:
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text("{not json")
    with pytest.raises(FormatError, match="kaggle.json is not valid JSON"):
        find_kaggle_credentials({}, home=tmp_path)
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "me"}')
    with pytest.raises(FormatError, match="lacks a 'username' or a 'key'"):
        find_kaggle_credentials({}, home=tmp_path)


def test_a_lookup_reports_a_broken_kaggle_json_instead_of_raising(tmp_path: Path) -> None:
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text("{not json")
    broken = look_up_kaggle_credentials({}, home=tmp_path)
    assert broken.credentials is None and "kaggle.json is not valid JSON" in (broken.problem or "")
    found = look_up_kaggle_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=tmp_path)
    assert found.problem is None and found.credentials is not None
    assert found.credentials.origin == "KAGGLE_USERNAME/KAGGLE_KEY"


def test_kaggle_notebook_token(tmp_path: Path) -> None:
    token = tmp_path / "jwt"
    token.write_text("nb")
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "KAGGLE_DATA_PROXY_URL": "http://proxy",
           "KAGGLE_API_V1_TOKEN": str(token), "KAGGLE_API_TOKEN": "other"}
    creds = find_kaggle_credentials(env, home=tmp_path)
    assert creds is not None and creds.origin == "KAGGLE_API_V1_TOKEN" and creds.token == "nb"


def test_colab_is_detected() -> None:
    assert in_colab({"COLAB_RELEASE_TAG": "release"}) and not in_colab({})
