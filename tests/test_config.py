"""The engine's own config: a value that cannot work is an error naming its key path."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import load
from engine.schema import ConfigError


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"server": {"accept_batch": 0}}, "server.accept_batch"),  # would never accept
        ({"server": {"workers": 0}}, "server.workers"),
        ({"server": {"max_head_size": 100}}, "server.max_head_size"),
        ({"server": {"underscores_in_headers": "keep"}}, "server.underscores_in_headers"),
        ({"source": "elsewhere.toml"}, "source"),  # set by the loader, not a key of the file
    ],
)
def test_values_that_cannot_work_name_their_key(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(data)
    assert info.value.path == where
