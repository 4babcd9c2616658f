"""Which scheduler owns a request, when several share the request stream: each takes an
entry through the consumer group and records itself as the request's `owner`; an abort
reaches that owner through its own abort stream; a live scheduler takes over the pending
entries of a peer whose liveness key expired. Each step is one atomic Redis script.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis

from shared.messages import AbortRequest, encode
from shared.redis_keys import RedisKeys

ABORTS_MAXLEN = 10_000  # an abort stream is read at once; this only bounds a dead owner's
# The abort flag of a request nobody has taken yet (it may never be: its entry was trimmed)
# must not stay forever; a day outlasts any queue wait.
UNTAKEN_FLAG_TTL_S = 86_400
TAKEOVER_BATCH = 1000  # entries claimed per script call (Lua's unpack has a limit of a few thousand)

# The consumer an entry is pending under now (nil: none, or Redis lost the stream or group).
# NOTE: only a takeover (XCLAIM) moves an entry we read to another consumer.
_PENDING_UNDER = """
local function pending_under(stream, group, id)
  local p = redis.pcall('xpending', stream, group, id, id, 1)
  if p.err then
    if string.find(p.err, 'NOGROUP', 1, true) then return nil end
    error(p)
  end
  if p[1] then return p[1][2] end
  return nil
end
"""

# Record the owner of each request taken (KEYS[1] the stream, KEYS[i+1] request i's hash,
# ARGV[i+2] its entry id), unless a peer took its entry over meanwhile ({'elsewhere', peer}:
# not ours, whatever the hash says) or it was aborted first ({'aborted', reason}).
# NOTE: this and _ABORT are atomic towards each other, so an abort either comes before the
# take (the taker sees the flag) or after it (the abort sees the owner).
_TAKE = (
    _PENDING_UNDER
    + """
local result = {}
for i = 2, #KEYS do
  local holder = pending_under(KEYS[1], ARGV[2], ARGV[i + 1])
  local reason = redis.call('hget', KEYS[i], 'abort')
  if holder and holder ~= ARGV[1] then result[i - 1] = {'elsewhere', holder}
  elseif reason then result[i - 1] = {'aborted', reason}
  else redis.call('hset', KEYS[i], 'owner', ARGV[1]); result[i - 1] = {'taken', ''} end
end
return result
"""
)

# The entries among ARGV[3..] that are pending under a consumer other than ARGV[2], as
# {id, consumer} pairs: those a peer took over from us.
_PENDING_ELSEWHERE = (
    _PENDING_UNDER
    + """
local elsewhere = {}
for i = 3, #ARGV do
  local holder = pending_under(KEYS[1], ARGV[1], ARGV[i])
  if holder and holder ~= ARGV[2] then elsewhere[#elsewhere + 1] = {ARGV[i], holder} end
end
return elsewhere
"""
)

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
        self._pending_elsewhere = client.register_script(_PENDING_ELSEWHERE)

    def take(self, name: str, entries: Sequence[tuple[str, str]]) -> Taken:
        """Record `name` as the owner of these requests, given as (request_id, entry_id),
        except those aborted first or whose entry a peer took over since we read it."""
        taken = Taken()
        if not entries:
            return taken
        keys = [self.keys.requests] + [self.keys.request(rid) for rid, _ in entries]
        rows = self._take(keys=keys, args=[name, self.keys.group] + [eid for _, eid in entries])
        for (rid, eid), (kind, detail) in zip(entries, rows):
            if _str(kind) == "aborted":
                taken.aborted[rid] = _str(detail)
            elif _str(kind) == "elsewhere":
                taken.elsewhere[eid] = _str(detail)
        return taken

    def abort(self, message: AbortRequest) -> str | None:
        """Flag the request as aborted and tell its owner; returns the owner's name (None
        when no scheduler has taken it yet: the one that does will see the flag)."""
        owner = self._abort(
            keys=[self.keys.request(message.request_id)],
            args=[
                message.reason,
                encode(message),
                self.keys.aborts("").removesuffix(":aborts"),
                ABORTS_MAXLEN,
                UNTAKEN_FLAG_TTL_S,
            ],
        )
        return _str(owner) if owner is not None else None

    def take_over(
        self, name: str, liveness_key: Callable[[str], str], limit: int | None = None
    ) -> dict[str, int]:
        """Claim for `name` the pending entries of consumers whose liveness key is gone, the
        oldest first, at most `limit` in all (None: every one); returns {dead consumer:
        entries claimed}. The caller replays its pending entries."""
        summary = self.client.xpending(self.keys.requests, self.keys.group)
        claimed: dict[str, int] = {}
        left = limit
        for consumer in summary.get("consumers") or []:
            peer = _str(consumer["name"])
            if peer == name:
                continue
            while left != 0:
                count = TAKEOVER_BATCH if left is None else min(left, TAKEOVER_BATCH)
                got = self._take_over(
                    keys=[self.keys.requests, liveness_key(peer)], args=[self.keys.group, name, peer, count]
                )
                if got:
                    claimed[peer] = claimed.get(peer, 0) + len(got)
                left = None if left is None else left - len(got)
                if len(got) < count:
                    break
        return claimed

    def pending_elsewhere(self, name: str, entry_ids: Sequence[str]) -> dict[str, str]:
        """{entry_id: consumer} of those of these entries now pending under a consumer other
        than `name`. One not pending at all (acknowledged, or lost with the stream) is not."""
        elsewhere: dict[str, str] = {}
        for start in range(0, len(entry_ids), TAKEOVER_BATCH):
            rows = self._pending_elsewhere(
                keys=[self.keys.requests],
                args=[self.keys.group, name, *entry_ids[start : start + TAKEOVER_BATCH]],
            )
            elsewhere.update((_str(eid), _str(peer)) for eid, peer in rows)
        return elsewhere


@dataclass
class Taken:
    """What `take` did not take: aborted first, or taken over by a peer since it was read."""

    aborted: dict[str, str] = field(default_factory=dict)  # request_id -> the abort's reason
    elsewhere: dict[str, str] = field(default_factory=dict)  # entry_id -> the consumer it is pending under


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
