"""API keys from the models file, an environment variable and a mounted file, checked by the real guard of the
in-process app (no models needed: the guard answers before any route, and /v1/models lists the cards)."""
from __future__ import annotations

import pytest

from contract.settings import ApiKeysUnavailable, ServerSettings
from serve_app.backends.base import Backends
from serve_app.http.routes import create_app
from tests.unit.test_routes import send

ENV = "ONNX_SERVE_TEST_API_KEYS"


def _app(**settings):
    return create_app(Backends(), [], ServerSettings(**settings))


def _status(app, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return send(app, "GET", "/v1/models", headers=headers).status_code


def test_keys_from_an_env_var_are_merged_with_the_listed_ones(monkeypatch):
    monkeypatch.setenv(ENV, "alpha, beta\ngamma\n")
    app = _app(api_keys=("listed",), api_keys_env=ENV)
    assert [_status(app, k) for k in ("alpha", "beta", "gamma", "listed")] == [200] * 4
    assert [_status(app, k) for k in ("wrong", "alpha,beta", "", None)] == [401] * 4
    assert send(app, "GET", "/health").status_code == 200


def test_keys_from_a_file_skip_blank_lines_and_comments(tmp_path):
    secret = tmp_path / "api-keys"
    secret.write_text("# rotated 2026-12\nfirst\n\n  second  \n#not-a-key\n", encoding="utf-8")
    app = _app(api_keys_file=str(secret))
    assert _status(app, "first") == _status(app, "second") == 200
    assert _status(app, "#not-a-key") == _status(app, "# rotated 2026-12") == _status(app, "thirds") == 401


def test_a_named_source_that_gives_no_keys_fails_at_start(tmp_path, monkeypatch):
    """Never 'no auth' because a secret was not mounted: building the app raises."""
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ApiKeysUnavailable, match=f"{ENV} is not set"):
        _app(api_keys_env=ENV)
    monkeypatch.setenv(ENV, " , \n")
    with pytest.raises(ApiKeysUnavailable, match="holds no keys"):
        _app(api_keys_env=ENV)
    with pytest.raises(ApiKeysUnavailable, match="cannot read .*missing"):
        _app(api_keys=("listed",), api_keys_file=str(tmp_path / "missing"))
    (tmp_path / "comments").write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ApiKeysUnavailable, match="holds no keys"):
        _app(api_keys_file=str(tmp_path / "comments"))


def test_no_keys_anywhere_is_open():
    assert _status(_app(), None) == 200
