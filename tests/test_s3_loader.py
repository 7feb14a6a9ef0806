"""The S3 clients' botocore loader: S3's data only, derived once and cached per user."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import botocore.loaders
import botocore.session
import pytest
from botocore.exceptions import UnknownServiceError
from botocore.model import ServiceModel
from botocore.regions import EndpointResolver

from datamover.storage import s3_loader
from datamover.storage.s3_loader import S3Loader, cut_to_s3, without_documentation

_REGIONS = (
    "us-east-1",
    "us-west-2",
    "eu-central-1",
    "ap-southeast-2",
    "cn-north-1",
    "us-gov-west-1",
    "us-iso-east-1",
    "xx-nowhere-7",
)


def _whole() -> Any:
    return botocore.loaders.Loader().load_data("endpoints")


#: The services botocore's credential providers make clients of (roles and web identity:
#: STS; SSO profiles: SSO, and SSO OIDC to refresh a token; `aws login`: sign-in).
_CREDENTIAL_SERVICES = ("sts", "sso", "sso-oidc", "signin")


def _prefix(service: str) -> str:
    """A service's endpoint prefix: its name in the endpoint table."""
    model = botocore.loaders.Loader().load_service_model(service, "service-2")
    return str(model["metadata"]["endpointPrefix"])


@pytest.mark.parametrize("service", ["s3", *_CREDENTIAL_SERVICES])
def test_the_cut_table_resolves_s3_and_the_credential_services_as_the_whole_one_does(
    service: str,
) -> None:
    # Before: the cut kept S3 alone; the session has one table for all its clients, so the
    # STS client of a role profile resolved its endpoint from the partition's defaults.
    whole = _whole()
    cut = cut_to_s3(whole)
    assert len(json.dumps(cut)) < len(json.dumps(whole)) / 20
    a, b = EndpointResolver(whole), EndpointResolver(cut)
    prefix = _prefix(service)
    for region in _REGIONS:
        for dual in (False, True):
            for fips in (False, True):
                kw = {"use_dualstack_endpoint": dual, "use_fips_endpoint": fips}
                assert a.construct_endpoint(prefix, region, **kw) == b.construct_endpoint(
                    prefix, region, **kw
                ), (region, kw)
    assert a.get_available_endpoints(prefix) == b.get_available_endpoints(prefix)


def _client(loader: botocore.loaders.Loader, region: str, endpoint: str | None) -> Any:
    session = botocore.session.get_session()
    session.register_component("data_loader", loader)
    return session.create_client(
        "s3",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
    )


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:8333"])
def test_clients_made_with_the_cut_table_are_the_same(tmp_path: Path, endpoint: str | None) -> None:
    for region in _REGIONS[:6]:
        a = _client(botocore.loaders.Loader(), region, endpoint)
        b = _client(S3Loader(cache_dir=tmp_path), region, endpoint)
        assert (a.meta.endpoint_url, a.meta.region_name, a.meta.partition) == (
            b.meta.endpoint_url,
            b.meta.region_name,
            b.meta.partition,
        ), region
        url_a = a.generate_presigned_url("get_object", {"Bucket": "bkt", "Key": "k"})
        url_b = b.generate_presigned_url("get_object", {"Bucket": "bkt", "Key": "k"})
        assert url_a.split("?")[0] == url_b.split("?")[0], region
        sa, sb = a._request_signer, b._request_signer
        assert (sa.signature_version, sa.signing_name, sa.region_name) == (
            sb.signature_version,
            sb.signing_name,
            sb.region_name,
        ), region


def test_the_cut_is_cached_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, path = S3Loader(cache_dir=tmp_path).load_data_with_path("endpoints")
    assert set(data["partitions"][0]["services"]) == {"s3", "sts", "portal.sso", "oidc"}
    assert botocore.loaders.Loader().is_builtin_path(path)  # reported as botocore's own
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith(f"endpoints-s3creds-{botocore.__version__}-")
    assert json.loads(cached.read_text()) == data

    def no_whole_load(self: Any, name: str) -> Any:
        raise AssertionError(f"loaded {name} whole")

    monkeypatch.setattr(botocore.loaders.Loader, "load_data_with_path", no_whole_load)
    again, again_path = S3Loader(cache_dir=tmp_path).load_data_with_path("endpoints")
    assert (again, again_path) == (data, path)


def test_a_cache_not_this_users_alone_or_damaged_is_not_read(tmp_path: Path) -> None:
    S3Loader(cache_dir=tmp_path).load_data_with_path("endpoints")
    (cached,) = tmp_path.iterdir()
    planted = cut_to_s3(_whole())
    planted["partitions"][0]["services"]["s3"]["endpoints"] = {}
    cached.write_text(json.dumps(planted))
    os.chmod(cached, 0o666)
    data, _ = S3Loader(cache_dir=tmp_path).load_data_with_path("endpoints")
    assert data == cut_to_s3(_whole())  # writable by others: cut again from botocore's
    cached.write_text("{not json")
    os.chmod(cached, 0o644)
    data, _ = S3Loader(cache_dir=tmp_path).load_data_with_path("endpoints")
    assert data == cut_to_s3(_whole())
    assert json.loads(cached.read_text()) == data  # and replaced


def test_an_unwritable_cache_costs_only_the_whole_load(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    data, _ = S3Loader(cache_dir=blocker / "datamover").load_data_with_path("endpoints")
    assert data == cut_to_s3(_whole())
    data, _ = S3Loader(cache_dir=None).load_data_with_path("endpoints")
    assert data == cut_to_s3(_whole())


def test_a_table_on_the_users_data_path_is_loaded_whole(tmp_path: Path) -> None:
    mine = {"partitions": [], "version": 3, "mine": True}
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "endpoints.json").write_text(json.dumps(mine))
    loader = s3_loader.loader_for(str(tmp_path / "models"))
    data, path = loader.load_data_with_path("endpoints")
    assert data == mine and not loader.is_builtin_path(path)
    assert not (tmp_path / "cache").exists()


def test_the_cache_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert s3_loader.default_cache_dir() == tmp_path / "datamover"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored, as XDG says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert s3_loader.default_cache_dir() == tmp_path / "home" / ".cache" / "datamover"


def test_the_cache_is_written_only_into_a_directory_of_the_users_alone(tmp_path: Path) -> None:
    # The temporary name is predictable: written through `open(tmp, "w")` into a shared
    # directory (`XDG_CACHE_HOME=/tmp/...`), a symlink planted there by another user had the
    # victim overwrite any file it could write.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    source = Path(botocore.loaders.Loader().load_data_with_path("endpoints")[1] + ".json")
    st = source.stat()
    name = f"endpoints-s3creds-{botocore.__version__}-{st.st_size}-{st.st_mtime_ns}.json"
    (shared / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    data, _ = S3Loader(cache_dir=shared).load_data_with_path("endpoints")
    assert data == cut_to_s3(_whole())
    assert victim.read_text() == "precious\n" and not (shared / name).exists()
    # In a directory of its own, a planted name is not followed either.
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    (own / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    S3Loader(cache_dir=own).load_data_with_path("endpoints")
    assert victim.read_text() == "precious\n"


def test_the_cache_is_trusted_whatever_the_umask(tmp_path: Path) -> None:
    # Under the usual umask 002 of user-private groups the file was made group-writable,
    # so never trusted: every command parsed the whole table and wrote the cut again.
    old = os.umask(0o002)
    try:
        S3Loader(cache_dir=tmp_path / "c").load_data_with_path("endpoints")
    finally:
        os.umask(old)
    (cached,) = (tmp_path / "c").iterdir()
    assert cached.stat().st_mode & 0o777 == 0o600
    assert s3_loader._read_trusted(cached, {"partitions": list}) is not None


def _s3_model(loader: botocore.loaders.Loader, type_name: str = "service-2") -> Any:
    return loader.load_service_model("s3", type_name)


def test_the_service_model_keeps_everything_but_its_documentation(tmp_path: Path) -> None:
    whole = _s3_model(botocore.loaders.Loader())
    for _ in range(2):  # derived, then read from the cache
        mine = _s3_model(S3Loader(cache_dir=tmp_path))
        assert mine == without_documentation(whole)
        assert len(json.dumps(mine)) < len(json.dumps(whole)) / 4
    a, b = ServiceModel(whole, "s3"), ServiceModel(mine, "s3")
    assert a.operation_names == b.operation_names
    assert [(p.name, p.type) for p in a.client_context_parameters] == [
        (p.name, p.type) for p in b.client_context_parameters
    ]
    for name in a.operation_names:
        oa, ob = a.operation_model(name), b.operation_model(name)
        assert oa.http == ob.http, name
        for sa, sb in ((oa.input_shape, ob.input_shape), (oa.output_shape, ob.output_shape)):
            if sa is None:
                assert sb is None, name
                continue
            assert sa.serialization == sb.serialization, name
            assert {k: (m.type_name, m.serialization) for k, m in sa.members.items()} == {
                k: (m.type_name, m.serialization) for k, m in sb.members.items()
            }, name
    rules = _s3_model(botocore.loaders.Loader(), "endpoint-rule-set-1")
    assert _s3_model(S3Loader(cache_dir=tmp_path), "endpoint-rule-set-1") == rules


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("s3/2006-03-01/service-2", "s3-2006-03-01-service-2-nodoc"),
        ("s3/2006-03-01/endpoint-rule-set-1", "s3-2006-03-01-endpoint-rule-set-1-same"),
    ],
)
def test_s3_data_is_cached_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, stem: str
) -> None:
    data, path = S3Loader(cache_dir=tmp_path).load_data_with_path(name)
    assert botocore.loaders.Loader().is_builtin_path(path)
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith(f"{stem}-{botocore.__version__}-")
    assert cached.stat().st_mode & 0o777 == 0o600

    def no_whole_load(self: Any, name: str) -> Any:
        raise AssertionError(f"loaded {name} whole")

    monkeypatch.setattr(botocore.loaders.Loader, "load_data_with_path", no_whole_load)
    assert S3Loader(cache_dir=tmp_path).load_data_with_path(name) == (data, path)


def test_a_cached_model_of_the_wrong_shape_is_not_used(tmp_path: Path) -> None:
    name = "s3/2006-03-01/service-2"
    good, _ = S3Loader(cache_dir=tmp_path).load_data_with_path(name)
    (cached,) = tmp_path.iterdir()
    cached.write_text(json.dumps({**good, "operations": []}))
    again, _ = S3Loader(cache_dir=tmp_path).load_data_with_path(name)
    assert again == good
    assert json.loads(cached.read_text()) == good  # and replaced


def test_the_loader_looks_for_s3_alone_and_loads_other_services_as_botocore_does(
    tmp_path: Path,
) -> None:
    # Before: any other service was unknown, so botocore could not make the STS or SSO
    # client of a credential provider in the S3 client's session.
    loader = S3Loader(cache_dir=tmp_path)
    assert loader.list_available_services("service-2") == ["s3"]
    assert loader.list_available_services("endpoint-rule-set-1") == ["s3"]
    assert loader.list_available_services("no-such-type-9") == []
    stock = botocore.loaders.Loader()
    for service in ("ec2", *_CREDENTIAL_SERVICES):
        for type_name in ("service-2", "endpoint-rule-set-1"):
            assert loader.load_service_model(service, type_name) == stock.load_service_model(
                service, type_name
            ), (service, type_name)
    with pytest.raises(UnknownServiceError):
        loader.load_service_model("no-such-service-9", "service-2")
    assert list(tmp_path.iterdir()) == []  # nothing of theirs cached


def test_a_session_with_the_loader_makes_the_credential_providers_clients(
    tmp_path: Path,
) -> None:
    session = botocore.session.get_session()
    session.register_component("data_loader", S3Loader(cache_dir=tmp_path))
    stock = botocore.session.get_session()
    for service in _CREDENTIAL_SERVICES:
        for region in _REGIONS[:6]:
            kw = {"region_name": region, "aws_access_key_id": "a", "aws_secret_access_key": "b"}
            a, b = session.create_client(service, **kw), stock.create_client(service, **kw)
            assert (a.meta.endpoint_url, a.meta.region_name, a.meta.partition) == (
                b.meta.endpoint_url,
                b.meta.region_name,
                b.meta.partition,
            ), (service, region)
            sa, sb = a._request_signer, b._request_signer
            assert (sa.signing_name, sa.region_name) == (sb.signing_name, sb.region_name)


def test_a_service_model_on_the_users_data_path_is_loaded_as_it_is(tmp_path: Path) -> None:
    whole = _s3_model(botocore.loaders.Loader())
    mine = {**whole, "metadata": {**whole["metadata"], "mine": True}}
    version = tmp_path / "models" / "s3" / "2006-03-01"
    version.mkdir(parents=True)
    (version / "service-2.json").write_text(json.dumps(mine))
    loader = S3Loader(extra_search_paths=[str(tmp_path / "models")], cache_dir=tmp_path / "c")
    assert loader.load_service_model("s3", "service-2") == mine  # documentation kept
    assert not any((tmp_path / "c").glob("s3-*service-2*"))


def test_older_caches_of_a_file_are_removed_when_it_is_derived_again(tmp_path: Path) -> None:
    name = "s3/2006-03-01/service-2"
    stale = [
        tmp_path / "s3-2006-03-01-service-2-nodoc-0.0.1-184646-1.json",  # older botocore
        tmp_path / "s3-2006-03-01-service-2-1.43.0-184646-1.json",  # older derivation
    ]
    kept = [tmp_path / "endpoints-s3-0.0.1-1-1.json", tmp_path / "notes.txt"]
    for f in stale + kept:
        f.write_text("{}")
    S3Loader(cache_dir=tmp_path).load_data_with_path(name)
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in kept)
    assert len(list(tmp_path.glob("s3-2006-03-01-service-2-nodoc-*.json"))) == 1
