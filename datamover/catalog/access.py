"""API tokens and pins in the catalog.

Tokens are random 256-bit strings shown once at creation and stored only as their SHA-256:
high-entropy secrets need no slow password hash, and a lookup stays one indexed query.
A pin holds a dataset's replica at this site for a job; eviction must skip pinned replicas.
Its id is the client's (a job id), so a pin is a tenant's: one id of two tenants is two pins.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Executable, delete, false, literal, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from datamover.catalog.engine import path_under, upsert_for
from datamover.catalog.models import Pin, Token, Transfer
from datamover.catalog.queue_sql import lineage
from datamover.domain.transfers import State

SCOPES = ("read", "write", "admin")
_KEY = ["tenant", "pin", "dataset"]  # the primary key of `pins`, the target of its upserts
TOKEN_PREFIX = "dm_"


def _now() -> datetime:
    return datetime.now(UTC)


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for: a tenant, its logical prefixes and its scopes."""

    token_id: str
    tenant: str
    prefixes: tuple[str, ...]
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """`admin` implies `write`, which implies `read`."""
        rank = SCOPES.index(scope)
        return any(SCOPES.index(s) >= rank for s in self.scopes)

    def covers(self, path: str) -> bool:
        """True when logical `path` lies under one of the token's prefixes."""
        return any(p == "/" or path == p or path.startswith(p + "/") for p in self.prefixes)


@dataclass(frozen=True)
class PinRow:
    """One pin on one dataset."""

    pin: str
    dataset: str
    tenant: str
    version: str | None
    created_at: str


@dataclass(frozen=True)
class TokenRow:
    """One token as `datamover token list` shows it: what it grants, not its secret."""

    id: str
    tenant: str
    prefixes: list[str]
    scopes: list[str]
    created_at: str
    expires_at: str | None
    revoked_at: str | None


def _iso(moment: datetime | None) -> str | None:
    """A catalog time as RFC 3339 in UTC to the second (SQLite hands back naive UTC)."""
    if moment is None:
        return None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pin_row(r: Any) -> PinRow:
    """A `pins` row as a `PinRow` (SQLite hands back naive datetimes, written as UTC)."""
    created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)
    return PinRow(r.pin, r.dataset, r.tenant, r.version, created.isoformat())


class Access:
    """Token and pin queries."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    async def create_token(
        self,
        tenant: str,
        prefixes: list[str],
        scopes: list[str],
        expires_at: datetime | None = None,
    ) -> tuple[str, Identity]:
        """Create a token (valid until `expires_at`, if given, or its revocation); return
        the secret (shown once) and what it grants."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok-" + secrets.token_hex(6)
        async with self.engine.begin() as conn:
            await conn.execute(
                Token.insert().values(
                    id=token_id,
                    hash=token_hash(secret),
                    tenant=tenant,
                    prefixes=json.dumps(sorted(set(prefixes))),
                    scopes=json.dumps(sorted(set(scopes))),
                    created_at=_now(),
                    expires_at=expires_at,
                )
            )
        return secret, Identity(token_id, tenant, tuple(sorted(set(prefixes))), frozenset(scopes))

    async def identify(self, secret: str) -> Identity | None:
        """The identity of a valid token (neither revoked nor expired), or None."""
        if not secret.isascii():  # ours are; a header's other bytes arrive as surrogates,
            return None  # which cannot even be encoded to hash them
        t = Token
        query = select(t).where(
            t.c.hash == token_hash(secret),
            t.c.revoked_at.is_(None),
            or_(t.c.expires_at.is_(None), t.c.expires_at > _now()),
        )
        async with self.engine.connect() as conn:
            r = (await conn.execute(query)).first()
        if r is None:
            return None
        return Identity(
            r.id, r.tenant, tuple(json.loads(r.prefixes)), frozenset(json.loads(r.scopes))
        )

    async def tokens(self, tenant: str | None = None, everyone: bool = False) -> list[TokenRow]:
        """The tokens still valid (with `everyone`, revoked and expired ones too), oldest
        first, optionally one tenant's: what each grants, never its secret or hash."""
        t = Token
        query = select(t).order_by(t.c.created_at, t.c.id)
        if tenant is not None:
            query = query.where(t.c.tenant == tenant)
        if not everyone:
            query = query.where(
                t.c.revoked_at.is_(None), or_(t.c.expires_at.is_(None), t.c.expires_at > _now())
            )
        async with self.engine.connect() as conn:
            return [
                TokenRow(
                    r.id,
                    r.tenant,
                    json.loads(r.prefixes),
                    json.loads(r.scopes),
                    _iso(r.created_at),
                    _iso(r.expires_at),
                    _iso(r.revoked_at),
                )
                for r in await conn.execute(query)
            ]

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token by id; False if there was no such active token."""
        t = Token
        stmt = update(t).where(t.c.id == token_id, t.c.revoked_at.is_(None))
        async with self.engine.begin() as conn:
            return bool((await conn.execute(stmt.values(revoked_at=_now()))).rowcount)

    async def add_pin(self, pin: str, dataset: str, tenant: str, version: str | None) -> PinRow:
        """Pin `dataset` under `tenant`'s `pin` and return the pin as the catalog holds it
        (idempotent: the latest version pinned wins, the first `created_at` stays)."""
        values = {
            "pin": pin,
            "dataset": dataset,
            "tenant": tenant,
            "version": version,
            "created_at": _now(),
        }
        insert = upsert_for(self.dialect, Pin)
        stmt = insert.values(**values).on_conflict_do_update(
            index_elements=_KEY, set_={"version": version}
        )
        p = Pin
        held = select(p).where(p.c.tenant == tenant, p.c.pin == pin, p.c.dataset == dataset)
        # Read back in the same transaction, not with RETURNING (SQLite has it from 3.35;
        # RHEL 9's is 3.34): the upsert's row lock (PostgreSQL) or write lock (SQLite)
        # keeps a concurrent release from coming between.
        async with self.engine.begin() as conn:
            await conn.execute(stmt)
            return _pin_row((await conn.execute(held)).one())

    async def move_pins(
        self, dataset: str, version: str, keys: Sequence[tuple[str, str]]
    ) -> list[PinRow]:
        """Record the pins `keys` (`(pin, tenant)`) of `dataset` that are at another version
        than `version` (not those with none) as at `version`, and return them as they were:
        a forced stage changed the files under their jobs, which now read `version`."""
        if not keys:
            return []
        p = Pin
        moved = (
            p.c.dataset == dataset,
            tuple_(p.c.pin, p.c.tenant).in_(list(keys)),
            p.c.version.is_not(None),
            p.c.version != version,
        )
        async with self.engine.begin() as conn:
            rows = [_pin_row(r) for r in await conn.execute(select(p).where(*moved))]
            if rows:
                await conn.execute(update(p).where(*moved).values(version=version))
        return rows

    async def pin_for_transfer(self, transfer_id: str, dataset: str, version: str | None) -> bool:
        """Pin `dataset` under the pin transfer `transfer_id` still carries, if it carries
        one, as a pin of the transfer's tenant; False when it does not (it had none, or
        `release` took it while the transfer ran: the job that asked for it is gone, so its
        pin must not outlive the release).

        One statement (`pins_for_transfers`), reading the transfer row under a lock on
        PostgreSQL, so a concurrent `release` either comes first (nothing is pinned) or
        deletes what this adds. Only while the transfer runs: a worker recording its end
        again (the first try's answer lost) after it had succeeded and the job's epilog had
        released the pin (which clears it from queued and running transfers only) brought
        the released pin back, for good.
        """
        async with self.engine.begin() as conn:
            stmt = self.pins_for_transfers([transfer_id], dataset, version, running=True)
            return bool((await conn.execute(stmt)).rowcount)

    def pins_for_transfers(
        self,
        transfer_ids: Sequence[str],
        dataset: str,
        version: str | None,
        running: bool = False,
    ) -> Executable:
        """The statement that pins `dataset` (at `version`) under the pin each of
        `transfer_ids` carries (with `running`, of those still running), for its tenant (those
        without one are skipped), reading the
        transfer rows under a lock on PostgreSQL: for a caller that runs it in its own
        transaction (`pin_for_transfer`, `Transfers.answer_stages`)."""
        t = Transfer
        source = (
            select(
                t.c.pin,
                literal(dataset),
                t.c.tenant,
                literal(version),
                literal(_now(), Pin.c.created_at.type),
            )
            .where(t.c.id.in_(list(transfer_ids)), t.c.pin.is_not(None))
            .with_for_update()
        )
        if running:  # those still running only
            source = source.where(t.c.state == State.RUNNING.value)
        insert = upsert_for(self.dialect, Pin).from_select(
            ["pin", "dataset", "tenant", "version", "created_at"], source
        )
        return insert.on_conflict_do_update(
            index_elements=_KEY, set_={"version": insert.excluded.version}
        )

    async def pins(
        self,
        pin: str | None = None,
        dataset: str | None = None,
        tenant: str | None = None,
        datasets: Sequence[str] | None = None,
    ) -> list[PinRow]:
        """Pins, optionally only one pin id, one dataset (or those of `datasets`) or one
        tenant's."""
        p = Pin
        query = select(p).order_by(p.c.pin, p.c.dataset, p.c.tenant)
        if pin is not None:
            query = query.where(p.c.pin == pin)
        if dataset is not None:
            query = query.where(p.c.dataset == dataset)
        if datasets is not None:
            query = query.where(p.c.dataset.in_(list(datasets)))
        if tenant is not None:
            query = query.where(p.c.tenant == tenant)
        async with self.engine.connect() as conn:
            return [_pin_row(r) for r in await conn.execute(query)]

    async def pins_near(self, dataset: str) -> list[PinRow]:
        """Pins on datasets above or below `dataset` (not on `dataset` itself), by dataset:
        those nested datasets share its tree where their prefixes map together."""
        p = Pin
        query = (
            select(p)
            .where(
                p.c.dataset != dataset,
                or_(p.c.dataset.in_(sorted(lineage(dataset))), path_under(p.c.dataset, dataset)),
            )
            .order_by(p.c.dataset, p.c.pin, p.c.tenant)
        )
        async with self.engine.connect() as conn:
            return [_pin_row(r) for r in await conn.execute(query)]

    async def release(
        self, pin: str, tenant: str | None = None, prefixes: Sequence[str] | None = None
    ) -> int:
        """Drop every dataset held by `tenant`'s `pin` (under one of `prefixes`, when given);
        return how many. Without `tenant`, the pin id of every tenant is dropped: only for
        the local CLI, which speaks for whoever owns the catalog.

        Queued and running transfers of those datasets lose the pin too (their `pin`
        becomes null), so a stage that a timed-out prolog left running does not pin its
        dataset after the job's hook released it; it still completes, and a requeued job
        submits its pin again. Both are writes, the transfers first: on PostgreSQL they
        lock the rows `pin_for_transfer` reads, and SQLite takes its write lock at once.
        """
        p, t = Pin, Transfer
        detach = update(t).where(
            t.c.pin == pin, t.c.state.in_((State.QUEUED.value, State.RUNNING.value))
        )
        stmt = delete(p).where(p.c.pin == pin)
        if tenant is not None:
            detach = detach.where(t.c.tenant == tenant)
            stmt = stmt.where(p.c.tenant == tenant)
        if prefixes is not None:
            detach = detach.where(or_(false(), *(path_under(t.c.path, x) for x in prefixes)))
            stmt = stmt.where(or_(false(), *(path_under(p.c.dataset, x) for x in prefixes)))
        async with self.engine.begin() as conn:
            await conn.execute(detach.values(pin=None))
            return (await conn.execute(stmt)).rowcount
