"""A stage does not bring a replica that other jobs' pins hold to another version."""

from __future__ import annotations

import json
from typing import Any

import pytest

from datamover.catalog.access import Access
from datamover.errors import Pinned
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_daemon import Daemon, StartSite
from tests.fixtures_sites import MakeSite, SiteEnv


async def test_a_replica_pinned_by_another_job_keeps_its_version(make_site: MakeSite) -> None:
    # Job 101 staged version 1 and runs; job 104's prolog staged version 2 over it, and the
    # files job 101 was reading changed under it (version 1's extra files stayed beside).
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version 1\n")
    (a.data / "ds" / "only-in-1").write_text("x\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        v1 = (await push(site_a, "/proj/ds")).version
        await stage(site_b, "/proj/ds", pin=("slurm-101", "t"))
        await Access(site_b.catalog.engine).add_pin("slurm-101", "/proj/ds", "t", v1)
        (a.data / "ds" / "f").write_text("version 2, longer\n")
        (a.data / "ds" / "only-in-1").unlink()
        v2 = (await push(site_a, "/proj/ds")).version
        with pytest.raises(Pinned, match=f"held at version {v1} by pin 'slurm-101'"):
            await stage(site_b, "/proj/ds", pin=("slurm-104", "t"))
        with pytest.raises(Pinned, match="by pin 'slurm-101' \\(tenant 't'\\):"):
            await stage(site_b, "/proj/ds")  # no pin of its own: every pin is another's
        with pytest.raises(Pinned, match="by another tenant's pin:"):
            await stage(site_b, "/proj/ds", pin=("slurm-101", "other-tenant"))
        assert (b.data / "ds" / "f").read_text() == "version 1\n"
        assert (await site_b.catalog.replica("/proj/ds")).version == v1  # type: ignore[union-attr]
        # The same version again is no change: allowed with any pin.
        assert (await stage(site_b, "/proj/ds", version=v1, pin=("slurm-104", "t"))).version == v1
        # The pin's own job (requeued) moves it on, as does --force.
        assert (await stage(site_b, "/proj/ds", pin=("slurm-101", "t"))).version == v2
        assert (b.data / "ds" / "f").read_text() == "version 2, longer\n"
        await stage(site_b, "/proj/ds", version=v1, pin=("slurm-101", "t"))
        await Access(site_b.catalog.engine).add_pin("slurm-105", "/proj/ds", "t", v1)
        assert (await stage(site_b, "/proj/ds", force=True)).version == v2
        # Released, the replica moves freely.
        await Access(site_b.catalog.engine).release("slurm-101", "t")
        await Access(site_b.catalog.engine).release("slurm-105", "t")
        assert (await stage(site_b, "/proj/ds", version=v1)).version == v1
    finally:
        await site_a.close()
        await site_b.close()


async def test_force_moves_only_the_pins_it_went_past(make_site: MakeSite) -> None:
    # A first version moved every pin of the dataset not at the staged version, also where
    # the stage changed no file (the tree at that version already) and other tenants' pins
    # a tenant's force cannot go past.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version 1\n")
    site_a, site_b = await a.open(), await b.open()
    access = Access(site_b.catalog.engine)
    try:
        v1 = (await push(site_a, "/proj/ds")).version
        (a.data / "ds" / "f").write_text("version 2\n")
        v2 = (await push(site_a, "/proj/ds")).version
        await stage(site_b, "/proj/ds", version=v2)
        await access.add_pin("old-job", "/proj/ds", "t2", v1)  # a pin asked at v1
        assert (await stage(site_b, "/proj/ds", version=v2, force=True)).version == v2
        assert {p.pin: p.version for p in await access.pins(dataset="/proj/ds")} == {
            "old-job": v1  # the tree did not change under it: nothing to record
        }
        await access.release("old-job", "t2")
        await stage(site_b, "/proj/ds", version=v1)
        await access.add_pin("mine", "/proj/ds", "t1", v1)
        await access.add_pin("theirs", "/proj/ds", "t2", v1)
        with pytest.raises(Pinned):  # a tenant's force goes past its own tenant's pins only
            await stage(site_b, "/proj/ds", version=v2, pin=("me", "t1"), force="tenant")
        await access.release("theirs", "t2")
        await access.add_pin("untouched", "/proj/other", "t2", v1)
        await access.add_pin("me", "/proj/ds", "t1", v1)  # the stage's own: its caller's
        await stage(site_b, "/proj/ds", version=v2, pin=("me", "t1"), force="tenant")
        assert {p.pin: p.version for p in await access.pins()} == {
            "me": v1,  # not gone past: the stage's caller pins it at what it staged
            "mine": v2,
            "untouched": v1,
        }
    finally:
        await site_a.close()
        await site_b.close()


async def test_the_cli_names_the_pin_and_takes_force(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version 1\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds", "--pin", "slurm-101").returncode == 0
    (a.data / "ds" / "f").write_text("version 2\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    proc = b.cli("stage", "/proj/ds", "--pin", "slurm-104")
    assert proc.returncode == 11, proc.stderr
    assert "pin 'slurm-101'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (b.data / "ds" / "f").read_text() == "version 1\n"
    forced = b.cli("stage", "/proj/ds", "--pin", "slurm-104", "--force", "--json")
    done = json.loads(forced.stdout)
    assert done["pin"] == "slurm-104"
    assert (b.data / "ds" / "f").read_text() == "version 2\n"
    # The pin it overrode is recorded at the version its job now reads (it had kept
    # version 1, so `pins` named a version the tree no longer held), and the stage says so.
    assert "'slurm-101'" in forced.stderr and "recorded at" in forced.stderr, forced.stderr
    pins = {p["pin"]: p["version"] for p in b.cli_json("pins", "/proj")["pins"]}
    assert pins == {"slurm-101": done["version"], "slurm-104": done["version"]}


async def _pushed_and_served(make_site: MakeSite, served_site: StartSite) -> tuple[SiteEnv, Daemon]:
    """Site A with `/proj/ds` pushed (`f` at "version 1"), and site B's daemon."""
    a = await make_site("site-a")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version 1\n")
    a.cli_json("push", "/proj/ds")
    return a, await served_site("site-b")


def _staged_via(d: Daemon, token: str, pin: str, **extra: Any) -> dict[str, Any]:
    """Stage `/proj/ds` through daemon `d` under `pin`; the ended transfer."""
    body = {"kind": "stage", "path": "/proj/ds", "pin": pin, **extra}
    status, t = d.request("POST", "/v1/transfers", token, body)
    assert status == 201, t
    return d.wait(t["id"], token)


async def test_through_the_daemon_a_pinned_replica_keeps_its_version(
    make_site: MakeSite, served_site: StartSite
) -> None:
    a, b = await _pushed_and_served(make_site, served_site)
    token = b.token("t1", "/proj", "write")

    def staged(pin: str, **extra: Any) -> dict[str, Any]:
        return _staged_via(b, token, pin, **extra)

    assert staged("slurm-101")["state"] == "succeeded"
    (a.data / "ds" / "f").write_text("version 2\n")
    a.cli_json("push", "/proj/ds")
    refused = staged("slurm-104")
    assert refused["state"] == "failed" and refused["error"]["code"] == "pinned", refused
    assert "slurm-101" in refused["error"]["message"]
    assert (b.env.data / "ds" / "f").read_text() == "version 1\n"
    assert staged("slurm-101")["state"] == "succeeded"  # the job itself, requeued
    assert (b.env.data / "ds" / "f").read_text() == "version 2\n"
    (a.data / "ds" / "f").write_text("version 3\n")
    a.cli_json("push", "/proj/ds")
    assert staged("slurm-104", force=True)["state"] == "succeeded"
    assert (b.env.data / "ds" / "f").read_text() == "version 3\n"


async def test_force_of_a_token_without_admin_leaves_other_tenants_pins_alone(
    make_site: MakeSite, served_site: StartSite
) -> None:
    # Before: any write token's `"force": true` staged over another tenant's pin, changing
    # the files under that tenant's running job, though it may not release that pin.
    a, b = await _pushed_and_served(make_site, served_site)
    t1, t2 = b.token("t1", "/proj", "write"), b.token("t2", "/proj", "write")
    admin = b.token("ops", "/", "admin")

    def staged(token: str, pin: str, **extra: Any) -> dict[str, Any]:
        return _staged_via(b, token, pin, **extra)

    assert staged(t2, "job-of-t2")["state"] == "succeeded"
    assert staged(t1, "job-of-t1")["state"] == "succeeded"  # same version: no change
    (a.data / "ds" / "f").write_text("version 2\n")
    a.cli_json("push", "/proj/ds")
    refused = staged(t1, "job-2-of-t1", force=True)
    assert refused["state"] == "failed" and refused["error"]["code"] == "pinned", refused
    message = refused["error"]["message"]
    assert "by another tenant's pin: " in message, message  # its own pins are forced past
    assert "job-of-t2" not in message and "an admin token's --force" in message, message
    assert (b.env.data / "ds" / "f").read_text() == "version 1\n"
    # Released by t2, t1's force goes past its own tenant's pin.
    assert b.request("DELETE", "/v1/pins/job-of-t2", t2)[1]["released"] == 1
    assert staged(t1, "job-3-of-t1", force=True)["state"] == "succeeded"
    assert (b.env.data / "ds" / "f").read_text() == "version 2\n"
    # An admin token's force goes past every tenant's pins.
    assert staged(t2, "job-4-of-t2")["state"] == "succeeded"  # same version again
    (a.data / "ds" / "f").write_text("version 3\n")
    a.cli_json("push", "/proj/ds")
    assert staged(t1, "job-5-of-t1", force=True)["state"] == "failed"
    assert staged(admin, "ops-1", force=True)["state"] == "succeeded"
    assert (b.env.data / "ds" / "f").read_text() == "version 3\n"


async def test_a_refusal_counts_only_the_callers_tenants_pins(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version 1\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        v1 = (await push(site_a, "/proj/ds")).version
        await stage(site_b, "/proj/ds")
        pins = Access(site_b.catalog.engine)
        for pin, tenant in (("x1", "other"), ("x2", "other"), ("x3", "other")):
            await pins.add_pin(pin, "/proj/ds", tenant, v1)
        (a.data / "ds" / "f").write_text("version 2\n")
        await push(site_a, "/proj/ds")
        with pytest.raises(Pinned, match="by another tenant's pin and others: ") as caught:
            await stage(site_b, "/proj/ds", pin=("mine", "t"))
        assert "x1" not in str(caught.value) and "2 more" not in str(caught.value)
        with pytest.raises(Pinned, match="by another tenant's pin and others: "):
            await stage(site_b, "/proj/ds", pin=("mine", "t"), force="tenant")
        await pins.add_pin("m1", "/proj/ds", "t", v1)
        await pins.add_pin("m2", "/proj/ds", "t", v1)
        with pytest.raises(Pinned, match="by pin 'm1' and 1 more and other tenants' pins: "):
            await stage(site_b, "/proj/ds", pin=("mine", "t"))
        with pytest.raises(Pinned) as caught:  # the site's operator, who may see them all
            await stage(site_b, "/proj/ds")
        # Before: "by a pin and 4 more", and no command listed them for `release --pin`.
        assert (
            "by pins 'm1' (tenant 't'), 'm2' (tenant 't'), 'x1' (tenant 'other') and 2 more: "
            in str(caught.value)
        )
        assert (b.data / "ds" / "f").read_text() == "version 1\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_pins_of_nested_datasets_do_not_stop_a_stage(make_site: MakeSite) -> None:
    # A job pinning /proj/ds and another asking for /proj/ds/sub want the same files: a
    # refusal on the parent's pin alone had the second wait for the first, then fail.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("version 1\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        v = (await push(site_a, "/proj/ds")).version
        await push(site_a, "/proj/ds/sub")
        await stage(site_b, "/proj/ds", pin=("slurm-101", "t"))
        await Access(site_b.catalog.engine).add_pin("slurm-101", "/proj/ds", "t", v)
        await stage(site_b, "/proj/ds/sub", pin=("slurm-104", "t"))
        assert (b.data / "ds" / "sub" / "f").read_text() == "version 1\n"
        # A pin on a dataset with no replica here guards no tree: a first stage goes ahead.
        await Access(site_b.catalog.engine).add_pin("slurm-9", "/proj/other", "t", None)
        (a.data / "other").mkdir()
        (a.data / "other" / "g").write_text("g\n")
        await push(site_a, "/proj/other")
        await stage(site_b, "/proj/other")
        assert (b.data / "other" / "g").read_text() == "g\n"
    finally:
        await site_a.close()
        await site_b.close()


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)
async def test_a_stage_run_here_with_a_pin_of_its_own_is_told_the_pins_and_plain_force(
    make_site: MakeSite,
) -> None:
    # Before: with `--pin`, "another tenant's pin ... or with an admin token's --force", to
    # an operator with no token at all, whose run here takes a plain --force.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version 1\n")
    v1 = a.cli_json("push", "/proj/ds")["version"]
    assert b.cli("stage", "/proj/ds").returncode == 0
    site_b = await b.open()
    try:
        await Access(site_b.catalog.engine).add_pin("job-of-t2", "/proj/ds", "t2", v1)
    finally:
        await site_b.close()
    (a.data / "ds" / "f").write_text("version 2\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    proc = b.cli("stage", "/proj/ds", "--pin", "job-9")
    assert proc.returncode == 11, proc.stderr
    assert "by pin 'job-of-t2' (tenant 't2'): " in proc.stderr
    assert proc.stderr.rstrip().endswith("or with --force") and "admin" not in proc.stderr
    assert b.cli("stage", "/proj/ds", "--pin", "job-9", "--force").returncode == 0


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)
async def test_pins_lists_the_pins_held_here_under_a_prefix(make_site: MakeSite) -> None:
    # Before: only GET /v1/replicas showed pins, with a token; a refusal said to release
    # them, by ids nothing listed.
    b = await make_site("site-b")
    site = await b.open()
    try:
        access = Access(site.catalog.engine)
        await access.add_pin("job-1", "/proj/ds", "t1", "20261206T000000.000000Z-a-00000001")
        await access.add_pin("job-2", "/proj/dsx/sub", "t2", None)
    finally:
        await site.close()
    under = b.cli_json("pins", "/proj/ds")
    assert [(p["pin"], p["dataset"], p["tenant"]) for p in under["pins"]] == [
        ("job-1", "/proj/ds", "t1")  # not /proj/dsx/sub: a prefix is a path, not a string
    ]
    assert [p["pin"] for p in b.cli_json("pins")["pins"]] == ["job-1", "job-2"]
    assert [p["pin"] for p in b.cli_json("pins", "--tenant", "t2")["pins"]] == ["job-2"]
    text = b.cli("pins", "/proj")
    assert "job-2  /proj/dsx/sub  tenant t2  version (as staged)  since " in text.stdout
    none = b.cli("pins", "/proj/other")
    assert (none.returncode, none.stdout, none.stderr) == (0, "", "no pins under /proj/other\n")
    bad = b.cli("pins", "relative/path")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    # A tenant no pin could have is named, as `release` names it (it listed no pins).
    for tenant, says in (
        ("", "must not be blank"),
        ("t\x01", "control character"),
        ("t" * 300, "longer than 128"),
    ):
        bad = b.cli("pins", "--tenant", tenant)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1, bad.stderr
