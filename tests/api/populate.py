"""Build a tenant with one of everything (subject, project, photo, design, job, plan file)."""

from __future__ import annotations

from dataclasses import dataclass

from api.services import Services
from dataprotection.fields import new_design
from siteplan import PIPELINE_VERSION
from siteplan.db import Job, Photo, PlanFile, Project, Subject
from tests.api.conftest import Api, Tenant


@dataclass
class World:
    tenant: Tenant
    ids: dict[str, str]  # path parameter name -> an id of this tenant


def populate(api: Api, t: Tenant, jpeg: bytes) -> World:
    svc: Services = api.svc
    c = api.client
    r = c.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan Janssens"}, headers=t.auth)
    assert r.status_code == 201, r.text
    subject_id = r.json()["id"]
    r = c.post(
        "/v1/projects",
        json={"contract_id": t.contract_id, "reference": "P-1", "subject_id": subject_id},
        headers=t.auth,
    )
    assert r.status_code == 201, r.text
    project_id = r.json()["id"]
    # A finished photo, a design with a file, a done job with one file: written directly, so the
    # isolation tests need no pipeline run.
    photo_obj = svc.vault.put(t.contract_id, jpeg)
    design_obj = svc.vault.put(t.contract_id, b"glTF-design")
    plan_obj = svc.vault.put(t.contract_id, b"glTF-plan")
    with svc.factory.begin() as db:
        assert db.get(Subject, subject_id) is not None and db.get(Project, project_id) is not None
        up = Photo(tenant_id=t.id, project_id=project_id, contract_id=t.contract_id, length=10, state="uploading")
        ph = Photo(
            tenant_id=t.id,
            project_id=project_id,
            contract_id=t.contract_id,
            length=len(jpeg),
            state="anonymised",
            object=photo_obj.object_id,
            sha256=photo_obj.sha256,
            intrinsics={"width": 2, "height": 2},
        )
        d = new_design(
            db,
            svc.vault.keys,
            tenant_id=t.id,
            project_id=project_id,
            contract_id=t.contract_id,
            descriptor={"name": "gate"},
        )
        d.file_format, d.object, d.size = "glb", design_obj.object_id, design_obj.size
        j = Job(
            tenant_id=t.id,
            project_id=project_id,
            state="done",
            pipeline_version=PIPELINE_VERSION,
            inputs={},
            timings={},
        )
        db.add_all([up, ph, j])
        db.flush()
        db.add(
            PlanFile(
                tenant_id=t.id,
                job_id=j.id,
                contract_id=t.contract_id,
                name="plan.glb",
                media_type="model/gltf-binary",
                object=plan_obj.object_id,
                size=plan_obj.size,
                sha256=plan_obj.sha256,
            )
        )
        ids = {
            "contract_id": t.contract_id,
            "subject_id": subject_id,
            "project_id": project_id,
            "photo_id": ph.id,
            "upload_id": up.id,
            "design_id": d.id,
            "job_id": j.id,
            "name": "plan.glb",
        }
    return World(t, ids)
