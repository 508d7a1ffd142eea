"""A config error about a secret names the key and what is accepted, never the value given."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ray_e5.config import ConfigError, load_config


@pytest.mark.parametrize("override", ["serve.api_key=123456", "serve.api_key=[s3cr3t-value]",
                                      "serve.api_key={token: 987654}"])
def test_an_error_on_a_secret_key_hides_the_value(override):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as err:
        load_config("ray_e5/recipes/quickstart.yaml", [override])
    message = str(err.value)
    print(message)
    assert key in message and "not shown" in message
    assert value.strip("[]") not in message and "987654" not in message


def test_validate_from_a_shell_does_not_print_the_key():
    done = subprocess.run([sys.executable, "-m", "ray_e5.cli", "validate", "--config", "quickstart",
                           "--set", "serve.api_key=123456"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stderr
    shown = done.stderr + done.stdout
    assert "serve.api_key" in shown and "123456" not in shown
