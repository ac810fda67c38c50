"""Rate limits per API key, answered with 429 and ``Retry-After``.

**Rate limit.** Each API key may make ``Settings.rate_limit_burst`` requests at once and
``Settings.rate_limit_per_second`` sustained. The algorithm is GCRA (the generic cell rate
algorithm, a token bucket kept as one number): a key's state is its *theoretical arrival time*
(TAT), the moment its bucket would be full again. A request at ``now`` passes when
``TAT - now <= tolerance`` (``tolerance = interval * (burst - 1)``, ``interval = 1 / rate``) and
then pushes the TAT one interval later; otherwise it must wait ``TAT - tolerance - now``.

- :class:`RedisRateLimiter` keeps the TAT in Redis (``limits_url``), so every API process shares one
  budget per key. Read, decide and write happen in one Lua script, atomically, in one round trip;
  the script reads Redis's clock (``TIME``), so API hosts whose clocks differ still agree. The key
  is ``netsurgery:rate:<sha256 of the API key>`` (never the key itself) and expires once the bucket
  is full again, so idle keys cost nothing.
- :class:`LocalRateLimiter` runs the same algorithm in the process, for the embedded one-process
  server (``limits_url`` empty with a non-Redis broker, or ``memory://``).
- **Redis unreachable → fail open.** The limit protects the service from a noisy client; a Redis
  outage must not become an outage of the whole API. So an error from Redis lets the request
  through, logs a warning, and Redis is not asked again for :data:`REDIS_BACKOFF_S` seconds (no
  request pays a connect timeout meanwhile). While Redis is away no key is limited.

Only keys that authenticated are counted (the limiter runs after the key was verified), so
unknown keys cannot fill Redis.

The quotas per tenant (active jobs, stored bytes) are :mod:`service.quotas`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Final, Protocol

import redis
from redis import asyncio as redis_async
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.retry import Retry

from service.settings import REDIS_SCHEMES, Settings

log = logging.getLogger(__name__)

#: Prefix of the Redis keys holding each API key's theoretical arrival time.
REDIS_PREFIX: Final = "netsurgery:rate:"
#: Seconds a Redis call may take (connect, or answer) before the request is let through.
REDIS_TIMEOUT_S: Final = 0.5
#: After a Redis error, seconds during which requests pass without asking Redis.
REDIS_BACKOFF_S: Final = 5.0
#: Keys the in-process limiter tracks before it forgets those whose bucket is full again.
LOCAL_MAX_KEYS: Final = 100_000

# KEYS[1]: the key's TAT (µs on Redis's clock); ARGV[1]: interval (µs per request); ARGV[2]: tolerance (µs).
# Returns {1, 0} when the request passes (and records it), {0, wait_µs} when it must wait.
_GCRA_LUA: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '') or now
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then
  return {0, math.ceil(wait)}
end
local new_tat = tat + interval
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%d', ttl_ms))
return {1, 0}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request may pass; if not, the seconds after which one would."""

    allowed: bool
    retry_after: float = 0.0


ALLOWED: Final = Decision(True)


class RateLimiter(Protocol):
    """Counts one request of ``key`` (the sha256 of an API key) and says whether it passes."""

    rate: float
    burst: int

    def hit(self, key: str) -> Decision: ...

    async def ahit(self, key: str) -> Decision: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


def gcra(tat: float | None, now: float, interval: float, tolerance: float) -> tuple[Decision, float | None]:
    """One GCRA step: the decision, and the new TAT to keep (None: keep the old one).

    ``tat`` is the key's theoretical arrival time (None for a key not seen, or whose bucket is full),
    ``interval`` the time one request costs (``1 / rate``), ``tolerance`` ``interval * (burst - 1)``.
    """
    tat = now if tat is None or tat < now else tat
    wait = tat - tolerance - now
    if wait > 0:
        return Decision(False, wait), None
    return ALLOWED, tat + interval


class LocalRateLimiter:
    """GCRA in this process's memory (monotonic clock); thread-safe. For a single API process."""

    def __init__(self, rate: float, burst: int, max_keys: int = LOCAL_MAX_KEYS) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.interval = 1.0 / rate
        self.tolerance = self.interval * (burst - 1)
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> Decision:
        with self._lock:
            now = time.monotonic()
            decision, tat = gcra(self._tat.get(key), now, self.interval, self.tolerance)
            if tat is not None:
                if key not in self._tat and len(self._tat) >= self.max_keys:
                    self._forget_full(now)
                self._tat[key] = tat
            return decision

    async def ahit(self, key: str) -> Decision:
        return self.hit(key)  # no I/O: answered on the event loop

    async def aclose(self) -> None:
        pass

    def _forget_full(self, now: float) -> None:
        # a TAT in the past means a full bucket, the same as no entry: dropping those changes nothing
        self._tat = {k: v for k, v in self._tat.items() if v > now}
        if len(self._tat) >= self.max_keys:  # all busy: start over (each key gets a fresh burst once)
            self._tat.clear()

    def close(self) -> None:
        pass


class RedisRateLimiter:
    """GCRA kept in Redis, shared by every API process using the same ``url``; fails open (see the module)."""

    def __init__(
        self,
        url: str,
        rate: float,
        burst: int,
        *,
        timeout: float = REDIS_TIMEOUT_S,
        backoff: float = REDIS_BACKOFF_S,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst, self.backoff = rate, burst, backoff
        self.interval_us = 1e6 / rate
        self.tolerance_us = self.interval_us * (burst - 1)
        # one immediate retry (a pooled connection that went stale when Redis restarted), no backoff:
        # this runs on every request and must not wait
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1)
        )
        self._script = self._client.register_script(_GCRA_LUA)
        self.url, self.timeout = url, timeout
        self._script_args = [f"{self.interval_us:.3f}", f"{self.tolerance_us:.3f}"]
        self._async_scripts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScript] = (
            weakref.WeakKeyDictionary()
        )
        self._down_until = 0.0

    def hit(self, key: str) -> Decision:
        if time.monotonic() < self._down_until:
            return ALLOWED
        try:
            allowed, wait_us = self._script(keys=[REDIS_PREFIX + key], args=self._script_args)
        except (redis.RedisError, OSError) as exc:
            return self._failed(exc)
        return ALLOWED if allowed else Decision(False, int(wait_us) / 1e6)

    async def ahit(self, key: str) -> Decision:
        """:meth:`hit` on the event loop: the same script through an asyncio client of this loop."""
        if time.monotonic() < self._down_until:
            return ALLOWED
        try:
            allowed, wait_us = await self._async_script()(keys=[REDIS_PREFIX + key], args=self._script_args)
        except (redis.RedisError, OSError) as exc:
            return self._failed(exc)
        return ALLOWED if allowed else Decision(False, int(wait_us) / 1e6)

    def _async_script(self) -> AsyncScript:
        # an asyncio client's connections belong to the loop that opened them, and one application
        # may be served from more than one loop (tests do): one client per loop
        loop = asyncio.get_running_loop()
        script = self._async_scripts.get(loop)
        if script is None:
            client = redis_async.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=AsyncRetry(NoBackoff(), 1),
            )
            script = self._async_scripts[loop] = client.register_script(_GCRA_LUA)
        return script

    def _failed(self, exc: BaseException) -> Decision:
        self._down_until = time.monotonic() + self.backoff
        log.warning(
            "rate limit: Redis failed (%s: %s); letting requests through unlimited for %.0f s",
            type(exc).__name__,
            exc,
            self.backoff,
        )
        return ALLOWED

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        """Close this loop's asyncio client (and the blocking one)."""
        script = self._async_scripts.pop(asyncio.get_running_loop(), None)
        if script is not None:
            await script.registered_client.aclose()
        self.close()


def make_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The limiter ``settings`` ask for: Redis-backed, in-process, or None when the rate limit is off."""
    if settings.rate_limit_per_second <= 0:
        return None
    if settings.limits_url.startswith(REDIS_SCHEMES):
        return RedisRateLimiter(settings.limits_url, settings.rate_limit_per_second, settings.rate_limit_burst)
    return LocalRateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
