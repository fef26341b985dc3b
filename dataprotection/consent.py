"""May this project's data be processed now? One check, asked by everything that processes
(the API before queueing, the runner before anonymising, a job and a batch when they start)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from siteplan.db import Contract, Project, Subject
from siteplan.states import ContractState

CONTRACT_NOT_ACTIVE = "contract not active"
CLIENT_RESTRICTED = "client restricted"
# The same reasons, said to a designer.
MESSAGES = {
    CONTRACT_NOT_ACTIVE: "the contract is not active; nothing may be processed under it",
    CLIENT_RESTRICTED: "processing of this client's data is restricted",
}


def consent_problem(db: Session, project: Project | None) -> str | None:
    """None when processing may go ahead, else the short reason (a key of ``MESSAGES``)."""
    if project is None:
        return CONTRACT_NOT_ACTIVE
    c = db.get(Contract, project.contract_id)
    if c is None or c.state != ContractState.ACTIVE:
        return CONTRACT_NOT_ACTIVE
    if project.subject_id is not None:
        s = db.get(Subject, project.subject_id)
        if s is not None and s.restricted:
            return CLIENT_RESTRICTED
    return None
