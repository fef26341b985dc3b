"""The embedded Ray listens on loopback only (#24): every listening socket of this process and
of the processes Ray started, listed during a run, is bound to 127.0.0.1 (or its IPv6-mapped
form). Without a node address a local Ray opened its GCS, raylet and object-manager ports on
the host's external address."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil
import ray

from siteplan.settings import Settings
from workers.runtime import ray_runtime


@ray.remote
def _pid() -> int:
    return os.getpid()


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return out


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_embedded_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", num_cpus=1)
    with ray_runtime(settings):
        worker = ray.get(_pid.remote())
        me = psutil.Process()
        pids = {me.pid, worker, *(p.pid for p in me.children(recursive=True))}
        socks = _listening(pids)
    assert any(name == "gcs_server" for _, _, name in socks), socks  # the run was really listed
    outside = [s for s in socks if not _loopback(s[0])]
    assert not outside, f"listening beyond loopback: {outside}"
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # set for the start only
