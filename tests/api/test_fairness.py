"""One tenant's decompression bombs (under the pixel cap, each many seconds of decoding) do not
hold another tenant's normal photo: it is anonymised within 10 s of its upload finishing (#24 D9).
Anonymisation was one first-in-first-out queue for all tenants."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from PIL import Image

from siteplan.db import Photo
from tests.api.conftest import Api, Tenant, open_sqlite_api
from tests.api.test_uploads import TUS, create, project

JPEG = next((Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg")).read_bytes()


def _bomb() -> bytes:
    """A ~20 MP PNG of one flat colour: some 70 KB that decode to 60 MB of pixels, and take
    ~15 s through the whole gate on this VM."""
    buf = io.BytesIO()
    Image.new("RGB", (5000, 4000), (90, 90, 90)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _send(api: Api, t: Tenant, pid: str, data: bytes) -> str:
    loc = create(api, t, pid, len(data))
    h = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    r = api.client.patch(loc, content=data, headers=h)
    assert r.status_code == 204, r.text
    return loc.rsplit("/", 1)[1]


def _state(api: Api, photo: str) -> str:
    with api.svc.factory() as db:
        return str(db.get(Photo, photo).state)


def test_bombs_of_one_tenant_do_not_hold_another_tenants_photo(tmp_path: Path) -> None:
    bomb = _bomb()
    with open_sqlite_api(tmp_path, ingest_workers=1, run_jobs=False) as api:
        from api.runner import Runner

        runner = Runner(api.svc)
        api.svc.runner = runner  # as the server has it: a finished upload is submitted at once
        try:
            a, b = api.tenant("Bombs"), api.tenant("Normal")
            pa, pb = project(api, a), project(api, b)
            bombs = [_send(api, a, pa, bomb) for _ in range(2)]
            deadline = time.monotonic() + 30
            while _state(api, bombs[0]) != "anonymising":  # the first bomb is being decoded
                assert time.monotonic() < deadline
                time.sleep(0.1)
            photo = _send(api, b, pb, JPEG)
            done_at = time.monotonic()
            while _state(api, photo) not in ("anonymised", "rejected"):
                assert time.monotonic() - done_at < 10, (
                    f"the other tenant's photo waited {time.monotonic() - done_at:.1f} s behind the bombs"
                )
                time.sleep(0.1)
            waited = time.monotonic() - done_at
            print(f"normal photo anonymised {waited:.1f} s after its upload, beside a running bomb")
            assert _state(api, photo) == "anonymised"
            assert _state(api, bombs[1]) == "quarantined", "the bomb tenant used more than its lane"
        finally:
            runner.shutdown()
            api.svc.runner = None


def test_fair_queue_takes_tenants_in_turn() -> None:
    from api.runner import FairQueue

    order: list[str] = []
    gate = threading.Event()

    def work(item: str) -> None:
        order.append(item)  # the order they start in
        gate.wait(5)
        time.sleep(0.05)  # a photo takes some time

    q = FairQueue(work, workers=1)
    futs = [q.submit("A", f"a{i}") for i in range(4)]
    futs += [q.submit("B", "b0"), q.submit("C", "c0"), q.submit("B", "b1")]
    time.sleep(0.2)
    gate.set()
    for f in futs:
        f.result(10)
    q.shutdown()
    # A's first and B's first start at once (two lanes, one each); then turns: no tenant waits
    # behind another's whole backlog.
    assert set(order[:2]) == {"a0", "b0"}, order
    assert order.index("c0") < order.index("a2"), order
    assert order.index("b1") < order.index("a3"), order
