"""Tenants and their API keys (only a key's SHA-256 is stored)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from typing import Final

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.errors import Conflict
from service.orm import ApiKey, Tenant, utcnow
from service.repositories import deleted_any

API_KEY_PREFIX: Final = "ns_"
# characters of a key kept in clear to tell keys apart in listings ("ns_" and 7 more)
DISPLAY_PREFIX_LENGTH: Final = 10
# longer than any key we issue; refuse to hash arbitrarily long header values
MAX_KEY_LENGTH: Final = 128


def hash_key(key: str) -> str:
    """The stored form of an API key: SHA-256, hex. (Keys are 256-bit random, so no salt or KDF is needed.)"""
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant_id: uuid.UUID) -> tuple[ApiKey, str]:
    """A new API key for the tenant: the row and the plaintext key, which is shown once and never stored."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, prefix=key[:DISPLAY_PREFIX_LENGTH], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return row, key


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant with one API key: the tenant and the plaintext key. :class:`Conflict` if the name is taken."""
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    _, key = create_api_key(session, tenant.id)
    return tenant, key


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    """The tenant called ``name``, if any (for the admin command)."""
    return session.scalar(select(Tenant).where(Tenant.name == name))


def revoke_api_key(session: Session, tenant_id: uuid.UUID, key_id: uuid.UUID) -> bool:
    """Revoke one of the tenant's keys; False if there is no such live key."""
    row = session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
    )
    if row is None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant that owns the live API key ``key``; None for an unknown, malformed or revoked key."""
    if not key.startswith(API_KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
        return None
    digest = hash_key(key)
    row = session.execute(
        select(Tenant, ApiKey.key_hash)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    # the index lookup found the row by hash; compare again in constant time all the same
    if row is None or not hmac.compare_digest(row[1], digest):
        return None
    tenant: Tenant = row[0]
    return tenant


def delete_tenant(session: Session, tenant_id: uuid.UUID) -> bool:
    """Delete a tenant and everything it owns (keys, models, datasets, jobs and their points)."""
    return deleted_any(session.execute(delete(Tenant).where(Tenant.id == tenant_id).returning(Tenant.id)))


def lock_tenant(session: Session, tenant_id: uuid.UUID) -> bool:
    """Lock the tenant's row until the transaction ends, serialising quota checks of one tenant; False if none.

    Postgres: ``SELECT … FOR NO KEY UPDATE``, which excludes a second such lock but not the key-share
    locks that inserts of the tenant's other rows take for their foreign key, so only other quota
    checks of this tenant wait. SQLite has no row locks: a no-op ``UPDATE`` of the row takes the
    database's write lock instead (the embedded server has one process, and writes are serial there).
    """
    if session.get_bind().dialect.name == "sqlite":
        result = session.execute(
            update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name).returning(Tenant.id)
        )
        return deleted_any(result)
    stmt = select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
    return session.scalar(stmt) is not None
