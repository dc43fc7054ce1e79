from __future__ import annotations

import pytest

from services.simulator import load_simulator_config
from shared.settings import SettingsError, load_settings


def test_agents_are_parsed_and_keys_never_shown() -> None:
    settings = load_settings({"PURPLEFLEA_AGENTS": "alice:sk-1, bob:sk-2"})
    assert [a.agent_id for a in settings.purpleflea_agents] == ["alice", "bob"]
    assert settings.purpleflea_agents[0].api_key == "sk-1"
    assert "sk-1" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PFLEA_WRITER_BATCH_SIZE": "lots"}, "PFLEA_WRITER_BATCH_SIZE"),
        ({"PFLEA_WRITER_BATCH_SIZE": "0"}, "PFLEA_WRITER_BATCH_SIZE"),
        ({"PFLEA_ACK_WAIT_S": "soon"}, "PFLEA_ACK_WAIT_S"),
        ({"PURPLEFLEA_AGENTS": "alice"}, "PURPLEFLEA_AGENTS"),
        ({"PURPLEFLEA_AGENTS": "a.b:key"}, "PURPLEFLEA_AGENTS"),
        ({"PURPLEFLEA_AGENTS": "a:k,a:k"}, "PURPLEFLEA_AGENTS"),
        ({"PFLEA_NAMESPACE": "Bad.NS"}, "PFLEA_NAMESPACE"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(variable + ":")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PFLEA_ACK_WAIT_S": "nan"}, "PFLEA_ACK_WAIT_S"),
        ({"PFLEA_INGEST_TIMEOUT_S": "inf"}, "PFLEA_INGEST_TIMEOUT_S"),
        ({"PFLEA_WRITER_PULL_BATCH": "0"}, "PFLEA_WRITER_PULL_BATCH"),
        ({"PFLEA_AGENTS_FROM_SIMULATOR": "maybe"}, "PFLEA_AGENTS_FROM_SIMULATOR"),
    ],
)
def test_a_number_that_is_not_one_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == variable


def test_the_simulator_and_the_services_report_a_bad_value_alike() -> None:
    with pytest.raises(SettingsError) as service:
        load_settings({"PFLEA_ACK_WAIT_S": "soon"})
    with pytest.raises(SettingsError) as simulator:
        load_simulator_config({"PFLEA_SIM_RATE": "soon"})
    assert str(service.value) == "PFLEA_ACK_WAIT_S: expected float, got 'soon'"
    assert str(simulator.value) == "PFLEA_SIM_RATE: expected float, got 'soon'"


def test_the_writer_pulls_as_many_messages_as_it_commits_transactions_unless_told_otherwise() -> None:
    assert load_settings({"PFLEA_WRITER_BATCH_SIZE": "250"}).messages_per_writer_pull() == 250
    split = load_settings({"PFLEA_WRITER_BATCH_SIZE": "250", "PFLEA_WRITER_PULL_BATCH": "40"})
    assert (split.writer_batch_size, split.messages_per_writer_pull()) == (250, 40)
