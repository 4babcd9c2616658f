"""Which scheduler owns a request, when several share the request stream: each takes an
entry through the consumer group and records itself as the request's `owner`; an abort
reaches that owner through its own abort stream; a live scheduler takes over the pending
entries of a peer whose liveness key expired. Each step is one atomic Redis script.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis

from shared.messages import AbortRequest, encode
from shared.redis_keys import RedisKeys

ABORTS_MAXLEN = 10_000  # an abort stream is read at once; this only bounds a dead owner's
# The abort flag of a request nobody has taken yet (it may never be: its entry was trimmed)
# must not stay forever; a day outlasts any queue wait.
UNTAKEN_FLAG_TTL_S = 86_400
TAKEOVER_BATCH = 1000  # entries claimed per script call (Lua's unpack has a limit of a few thousand)

# Record the owner of each request taken, unless it was aborted first: then return the
# reason. NOTE: this and _ABORT are atomic towards each other, so an abort either comes
# before the take (the taker sees the flag) or after it (the abort sees the owner).
_TAKE = """
local aborted = {}
for i, key in ipairs(KEYS) do
  local reason = redis.call('hget', key, 'abort')
  if reason then aborted[i] = reason else redis.call('hset', key, 'owner', ARGV[1]); aborted[i] = '' end
end
return aborted
"""

# Flag the request as aborted and forward the abort to its owner's stream, if it has one.
# The owner's stream key is built here (ARGV[3] is the key's prefix): a single Redis, no cluster.
_ABORT = """
local existed = redis.call('exists', KEYS[1])
redis.call('hset', KEYS[1], 'abort', ARGV[1])
local owner = redis.call('hget', KEYS[1], 'owner')
if owner then
  redis.call('xadd', ARGV[3] .. owner .. ':aborts', 'MAXLEN', '~', ARGV[4], '*', 'msg', ARGV[2])
elseif existed == 0 then
  redis.call('expire', KEYS[1], ARGV[5])
end
return owner
"""

# Claim a peer's pending entries for ARGV[2], only while the peer's liveness key (KEYS[2])
# is missing: checked and claimed in one step, so a peer that renews its key in time keeps
# every entry. Two claimers run one after the other; the second finds nothing left.
_TAKE_OVER = """
if redis.call('exists', KEYS[2]) == 1 then return {} end
local pending = redis.call('xpending', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[3])
if #pending == 0 then return {} end
-- NOTE: unpack() expands fully only as the last argument, so the call is built as one list.
local call = {'xclaim', KEYS[1], ARGV[1], ARGV[2], 0}
for _, p in ipairs(pending) do call[#call + 1] = p[1] end
call[#call + 1] = 'JUSTID'
return redis.call(unpack(call))
"""


class Ownership:
    """The scripts, registered once on a client."""

    def __init__(self, client: redis.Redis, keys: RedisKeys):
        self.client = client
        self.keys = keys
        self._take = client.register_script(_TAKE)
        self._abort = client.register_script(_ABORT)
        self._take_over = client.register_script(_TAKE_OVER)

    def take(self, name: str, request_ids: Sequence[str]) -> dict[str, str]:
        """Record `name` as the owner of these requests; returns {request_id: abort reason}
        of those aborted before they were taken (they are not taken)."""
        if not request_ids:
            return {}
        reasons = self._take(keys=[self.keys.request(rid) for rid in request_ids], args=[name])
        return {rid: _str(r) for rid, r in zip(request_ids, reasons) if r}

    def abort(self, message: AbortRequest) -> str | None:
        """Flag the request as aborted and tell its owner; returns the owner's name (None
        when no scheduler has taken it yet: the one that does will see the flag)."""
        owner = self._abort(keys=[self.keys.request(message.request_id)],
                            args=[message.reason, encode(message), self.keys.aborts("").removesuffix(":aborts"),
                                  ABORTS_MAXLEN, UNTAKEN_FLAG_TTL_S])
        return _str(owner) if owner is not None else None

    def take_over(self, name: str, liveness_key: Callable[[str], str]) -> dict[str, int]:
        """Claim for `name` every pending entry of a consumer whose liveness key is gone;
        returns {dead consumer: entries claimed}. The caller replays its pending entries."""
        summary = self.client.xpending(self.keys.requests, self.keys.group)
        claimed: dict[str, int] = {}
        for consumer in summary.get("consumers") or []:
            peer = _str(consumer["name"])
            if peer == name:
                continue
            while True:
                got = self._take_over(keys=[self.keys.requests, liveness_key(peer)],
                                      args=[self.keys.group, name, peer, TAKEOVER_BATCH])
                if got:
                    claimed[peer] = claimed.get(peer, 0) + len(got)
                if len(got) < TAKEOVER_BATCH:
                    break
        return claimed

    def pending_of(self, name: str, count: int) -> set[str]:
        """Entry ids pending under consumer `name` (up to `count`)."""
        rows = self.client.xpending_range(self.keys.requests, self.keys.group, "-", "+", count, consumername=name)
        return {_str(row["message_id"]) for row in rows}


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
