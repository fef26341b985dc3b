"""The states the API documents are exactly the core's (siteplan.states): a state added to a
table's StrEnum and not to the API's schema would be a 500 on every read of such a row."""

from __future__ import annotations

import typing
from enum import StrEnum

import pytest
from pydantic import BaseModel

from api.schemas import ContractPublic, JobPublic, PhotoPublic
from siteplan.states import ContractState, JobState, PhotoState


@pytest.mark.parametrize(
    ("model", "states"), [(ContractPublic, ContractState), (PhotoPublic, PhotoState), (JobPublic, JobState)]
)
def test_the_api_documents_every_state_of_its_table(model: type[BaseModel], states: type[StrEnum]) -> None:
    documented = typing.get_args(model.model_fields["state"].annotation)
    assert list(documented) == [s.value for s in states]
