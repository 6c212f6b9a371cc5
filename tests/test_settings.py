"""Settings: one declaration per variable, one loader, and docs that agree with both."""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

import pytest

from server.config import (
    ConsumerSettings,
    LimitsSettings,
    RedisSettings,
    Settings,
    SettingsError,
    declared_variables,
    variable_of,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BASE_ENV = {"CHATSTREAM_DATABASE_URL": "postgresql+asyncpg://x/y", "CHATSTREAM_REDIS_URL": "redis://x"}

# Variables in our prefix that are not Settings fields, with the file that reads (or names) each:
# the test checks that file still does, so this list cannot outlive the code.
READ_ELSEWHERE: dict[str, str] = {
    "CHATSTREAM_WORKERS": "server/supervisor.py",
    "CHATSTREAM_WORKER_INDEX": "server/supervisor.py",
    "CHATSTREAM_LOG_LEVEL": "server/logs.py",
    "CHATSTREAM_LOG_FORMAT": "server/logs.py",
    "CHATSTREAM_DEV_DIR": "server/constants.py",
    "CHATSTREAM_TOKEN": "server/constants.py",
    "CHATSTREAM_TEST_DATABASE_URL": "tests/conftest.py",
    "CHATSTREAM_TEST_REDIS_URL": "tests/conftest.py",
    "CHATSTREAM_TEST_REDIS": "tests/conftest.py",
    "CHATSTREAM_BENCH_DATABASE_URL": "bench/harness.py",
    "CHATSTREAM_BENCH_REDIS_URL": "bench/harness.py",
    # Injected by Kubernetes service links for a Service named `chatstream`; the manifests
    # turn them off, and the docs say why.
    "CHATSTREAM_PORT": "deploy/k8s/server.yaml",
    "CHATSTREAM_SERVICE_HOST": "deploy/k8s/server.yaml",
}
_NAME = re.compile(r"\b(?:CHATSTREAM|ANTHROPIC)_[A-Z0-9_]*[A-Z0-9]\b")


def _declared() -> dict[str, tuple[dataclasses.Field[object], object]]:
    """Each declared variable with its field and the value it has when unset."""
    defaults = Settings.from_env(BASE_ENV)
    return {
        var.name: (f, getattr(getattr(defaults, group), f.name)) for group, f, var in declared_variables()
    }


def _readme_table() -> list[tuple[list[str], str]]:
    """The settings table's rows: the variables of the first column, the default column."""
    rows = []
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            names = _NAME.findall(cells[0])
            if names:
                rows.append((names, cells[1]))
    return rows


def _shown(value: object) -> str:
    """A default as the README's table writes it."""
    if value is None:
        return "unset"
    if value in ("", ()):
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def test_every_declared_variable_is_in_the_readme_table_and_every_row_is_declared() -> None:
    declared = _declared()
    in_table = {name for names, _ in _readme_table() for name in names}
    assert sorted(set(declared) - in_table) == [], "declared in server/config.py, missing from README's table"
    undeclared = in_table - set(declared) - set(READ_ELSEWHERE)
    assert sorted(undeclared) == [], "in README's table, but no Settings field reads it"


def test_the_readme_table_shows_each_declared_default() -> None:
    declared = _declared()
    for names, default_cell in _readme_table():
        cells = [cell.strip() for cell in default_cell.split(",")]
        for index, name in enumerate(names):
            if name not in declared:
                continue
            field, value = declared[name]
            shown = cells[index] if len(cells) == len(names) else default_cell
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                assert shown == "required", name
            elif field.default_factory is not dataclasses.MISSING:
                continue  # computed per process (the consumer's host-pid name)
            else:
                assert shown.split(" ")[0] == _shown(value), f"{name}: README says {shown}"


def test_every_variable_named_in_the_docs_and_the_server_is_declared_or_read_elsewhere() -> None:
    documents = [
        README,
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "deploy").rglob("*.y*ml")),
        *sorted((ROOT / "server").rglob("*.py")),  # error messages spell names too
    ]
    declared = set(_declared())
    for document in documents:
        named = {name for name in _NAME.findall(document.read_text()) if name.startswith("CHATSTREAM_")}
        unknown = named - declared - set(READ_ELSEWHERE)
        assert sorted(unknown) == [], f"{document.relative_to(ROOT)} names variables nothing reads"


def test_variable_of_names_a_fields_declared_variable() -> None:
    assert variable_of("metrics_listen") == "CHATSTREAM_METRICS_LISTEN"
    assert variable_of("database_url") == "CHATSTREAM_DATABASE_URL"
    with pytest.raises(KeyError):
        variable_of("metrics")


def test_each_variable_read_elsewhere_is_still_there() -> None:
    for name, path in READ_ELSEWHERE.items():
        assert name in (ROOT / path).read_text(), f"{name} is no longer in {path}"


def _typed_variables() -> list[str]:
    """Every variable whose value is parsed: numbers, booleans, choices."""
    typed = []
    defaults = Settings.from_env(BASE_ENV)
    for group, f, var in declared_variables():
        if isinstance(getattr(getattr(defaults, group), f.name), int | float | enum.Enum):
            typed.append(var.name)
    return typed


@pytest.mark.parametrize("name", _typed_variables())
def test_a_malformed_value_fails_with_one_line_naming_the_variable(name: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**BASE_ENV, name: "eleven"})
    message = str(caught.value)
    assert message.startswith(f"{name} must be "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHATSTREAM_MAX_STREAMS", "0", "CHATSTREAM_MAX_STREAMS must be at least 1, got 0"),
        ("CHATSTREAM_LIVE_MAXLEN", "9", "CHATSTREAM_LIVE_MAXLEN must be at least 10, got 9"),
        ("CHATSTREAM_WRITE_TIMEOUT_S", "0.05", "CHATSTREAM_WRITE_TIMEOUT_S must be at least 0.1, got 0.05"),
        ("CHATSTREAM_SHUTDOWN_GRACE_S", "0", "CHATSTREAM_SHUTDOWN_GRACE_S must be positive, got 0.0"),
        ("CHATSTREAM_AUTH_MODE", "maybe", "CHATSTREAM_AUTH_MODE must be one of none|required, got 'maybe'"),
    ],
)
def test_values_out_of_bounds_fail_with_the_declared_bound(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**BASE_ENV, name: value})
    assert str(caught.value) == message


def test_required_urls_are_named_when_missing() -> None:
    with pytest.raises(SettingsError, match=r"^CHATSTREAM_DATABASE_URL is not set \(postgresql\+asyncpg://"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match=r"^CHATSTREAM_REDIS_URL is not set \(redis://"):
        Settings.from_env({"CHATSTREAM_DATABASE_URL": "postgresql+asyncpg://x/y"})


def test_each_group_is_read_from_its_variables() -> None:
    settings = Settings.from_env(
        {
            **BASE_ENV,
            "CHATSTREAM_SHARDS": "8",
            "CHATSTREAM_CONSUMER_BATCH": "7",
            "CHATSTREAM_MAX_STREAMS": "3",
            "CHATSTREAM_LIVE_LOG": "off",
            "CHATSTREAM_JWT_ACT_FOR_USERS": " a, b ,",
            "CHATSTREAM_MODEL": "",  # empty is unset
        }
    )
    assert settings.redis == RedisSettings(redis_url="redis://x", shards=8)
    assert settings.consumer.consumer_batch == 7
    assert settings.limits.max_streams == 3
    assert settings.turns.live_log is False
    assert settings.auth.jwt_act_for_users == ("a", "b")
    assert settings.llm.model == "claude-sonnet-4-5"
    assert "redis://x" not in repr(settings)
    assert "postgresql" not in repr(settings)


def test_with_overrides_routes_flat_names_to_their_group() -> None:
    settings = Settings.from_env(BASE_ENV)
    changed = settings.with_overrides(max_streams=1, consumer_batch=9)
    assert changed.limits == dataclasses.replace(LimitsSettings(), max_streams=1)
    assert changed.consumer == dataclasses.replace(settings.consumer, consumer_batch=9)
    assert changed.llm is settings.llm
    assert isinstance(changed.consumer, ConsumerSettings)
    with pytest.raises(TypeError, match="no field 'max_stream'"):
        settings.with_overrides(max_stream=1)
