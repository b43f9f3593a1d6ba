"""Server settings: defaults, VQDIFF_* environment variables, flags over both, loud bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings


def test_environment_then_flags():
    env = {"VQDIFF_MAX_ROWS": "16", "VQDIFF_API_KEYS": "a, b,", "VQDIFF_MODEL": "/m", "VQDIFF_REQUEST_TIMEOUT_S": "2.5",
           "VQDIFF_GRPC_PORT": "0"}
    s = Settings.from_env(env)
    assert (s.max_rows, s.api_keys, s.model, s.request_timeout_s, s.grpc_port) == (16, ("a", "b"), Path("/m"), 2.5, 0)
    assert s.max_images == 8 and Settings(max_rows=6).max_images == 3  # follows the row budget
    s = Settings.from_env(env, max_rows=4, api_keys=["k"], http_port=None)
    assert s.max_rows == 4 and s.api_keys == ("k",) and s.http_port == 8000


@pytest.mark.parametrize("env, name", [
    ({"VQDIFF_MAX_ROWS": "lots"}, "VQDIFF_MAX_ROWS"),
    ({"VQDIFF_MAX_ROWS": "7"}, "VQDIFF_MAX_ROWS"),
    ({"VQDIFF_HTTP_PORT": "70000"}, "VQDIFF_HTTP_PORT"),
    ({"VQDIFF_DTYPE": "fp8"}, "VQDIFF_DTYPE"),
    ({"VQDIFF_MAX_ROWS": "4", "VQDIFF_MAX_IMAGES": "3"}, "VQDIFF_MAX_IMAGES"),
    ({"VQDIFF_REQUEST_TIMEOUT_S": "0"}, "VQDIFF_REQUEST_TIMEOUT_S"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)
