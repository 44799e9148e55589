//! The Redis key layout and the server-side scripts (publish, read, fence, leases).
//!
//! For channel `C` under prefix `P`:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `P:m:{C}` | hash | `e` the channel's epoch, `t` its top offset; after a fence, `p` the previous epoch and `b` the last offset both share |
//! | `P:s:{C}` | stream | the history: entry id `<offset>-0`, fields `d` (data) and `t` (ms) |
//! | `P:p:C` | pub/sub topic | `r<offset>,<epoch>,<data>` or `e<offset>,<epoch>,<data>` |
//! | `P:demand` | pub/sub topic | a channel a node newly has subscribers on |
//! | `{P}:lease:N` | string | the node id holding cluster-wide role `N` (e.g. the simulator) |
//! | `{P}:nodes` | sorted set | node ids by the time (ms) of their last advertisement |
//! | `{P}:node:ID` | string | node `ID`'s advertisement (JSON), expiring unless renewed |
//!
//! The braces are a Redis Cluster hash tag: both keys of a channel live in one slot, so each
//! script touches one slot, and the cluster-level keys share the slot of `{P}`. Channel
//! names cannot contain braces (protocol rules).

/// Keys and topic of one channel.
#[derive(Debug, Clone)]
pub struct ChannelKeys {
    pub meta: String,
    pub stream: String,
    pub topic: String,
}

impl ChannelKeys {
    pub fn new(prefix: &str, channel: &str) -> Self {
        ChannelKeys {
            meta: format!("{prefix}:m:{{{channel}}}"),
            stream: format!("{prefix}:s:{{{channel}}}"),
            topic: format!("{prefix}:p:{channel}"),
        }
    }
}

/// The pub/sub topic prefix; what follows it is the channel name.
pub fn topic_prefix(prefix: &str) -> String {
    format!("{prefix}:p:")
}

/// The pub/sub topic on which a node announces a channel it newly has subscribers on.
pub fn demand_topic(prefix: &str) -> String {
    format!("{prefix}:demand")
}

/// Publishes one or more messages on one channel, atomically (no other publish on the
/// channel comes between them): reads or creates the epoch (a new epoch starts an empty
/// history), assigns the next offsets, appends to the stream trimmed to the history size,
/// refreshes TTLs, then PUBLISHes each. Returns `{epoch, offset1, offset2, ...}`.
///
/// KEYS: meta, stream. ARGV: mode (`r` retained / `e` ephemeral), history size, history TTL
/// ms (0: none), meta TTL ms, topic, epoch to use if the channel has none, then the data of
/// each message.
pub const PUBLISH: &str = r#"
local meta, stream = KEYS[1], KEYS[2]
local mode, size = ARGV[1], tonumber(ARGV[2])
local hist_ttl, meta_ttl, topic = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 't', 0)
end
local out = {epoch}
local ms = 0
if mode == 'r' and size > 0 then
  local now = redis.call('TIME')
  ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
for i = 7, #ARGV do
  local data = ARGV[i]
  local offset
  if mode == 'r' then
    offset = redis.call('HINCRBY', meta, 't', 1)
    if size > 0 then
      redis.call('XADD', stream, 'MAXLEN', size, offset .. '-0', 'd', data, 't', ms)
    end
  else
    offset = tonumber(redis.call('HGET', meta, 't'))
  end
  redis.call('PUBLISH', topic, mode .. offset .. ',' .. epoch .. ',' .. data)
  out[#out + 1] = offset
end
if mode == 'r' and size > 0 then
  if hist_ttl > 0 then
    redis.call('PEXPIRE', stream, hist_ttl)
  else
    redis.call('PEXPIRE', stream, meta_ttl)
  end
end
redis.call('PEXPIRE', meta, meta_ttl)
return out
"#;

/// Reads a channel's position and the history a node needs, atomically; creates the epoch
/// when the channel has none, so every node agrees on it before the first publish.
/// Returns `{epoch, top, previous epoch, base, offset1, data1, offset2, data2, ...}`, oldest
/// first; the previous epoch (empty if none) and the base are set by [`FENCE`].
///
/// What is read: at least the last `tail` entries, and the entries after `since` when
/// `since_epoch` is the channel's epoch (or is empty, meaning any); when it is the previous
/// epoch, the entries after the part both epochs share (`base`); when it is another one and
/// `catch_up` is `1` (a node catching up, not a client), every entry (all are new to it). At
/// most `limit`. Entries older than the history TTL are left out, as the local history would
/// have expired them.
///
/// KEYS: meta, stream. ARGV: since (-1: none), since_epoch, tail, limit, history TTL ms,
/// meta TTL ms, epoch to use if the channel has none, `1` to create a missing channel (`0`:
/// answer an empty array instead), `1` to catch up.
pub const READ: &str = r#"
local meta, stream = KEYS[1], KEYS[2]
local since, since_epoch = tonumber(ARGV[1]), ARGV[2]
local tail, limit, hist_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local epoch = redis.call('HGET', meta, 'e')
if not epoch and ARGV[8] ~= '1' then
  return {}
end
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 't', 0)
end
redis.call('PEXPIRE', meta, tonumber(ARGV[6]))
local top = tonumber(redis.call('HGET', meta, 't'))
local prev = redis.call('HGET', meta, 'p') or ''
local base = tonumber(redis.call('HGET', meta, 'b') or 0)
local from = top
if tail > 0 then from = math.max(0, top - tail) end
if since >= 0 then
  local s = nil
  if since_epoch == '' or since_epoch == epoch then
    s = since
  elseif since_epoch == prev then
    s = math.min(since, base)
  elseif ARGV[9] == '1' then
    s = 0
  end
  if s and s < from then from = s end
end
local out = {epoch, top, prev, base}
if from < top and limit > 0 then
  local cutoff = 0
  if hist_ttl > 0 then
    local now = redis.call('TIME')
    cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - hist_ttl
  end
  local entries = redis.call('XRANGE', stream, (from + 1) .. '-0', '+', 'COUNT', limit)
  for _, e in ipairs(entries) do
    local f = e[2]
    if tonumber(f[4]) >= cutoff then
      out[#out + 1] = string.sub(e[1], 1, -3)
      out[#out + 1] = f[2]
    end
  end
end
return out
"#;

/// Moves a channel whose history went back (a failover lost writes a node had delivered)
/// to a new epoch, remembering the previous one and how far both agree (`base`), so nodes
/// that held the previous epoch deliver only what follows `base`, and clients recovering
/// past it are told `recovered: false`. Does nothing if another node fenced it first.
/// KEYS: meta. ARGV: the epoch found behind, the new epoch, base, meta TTL ms. Returns the
/// channel's epoch afterwards.
pub const FENCE: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch == ARGV[1] then
  redis.call('HSET', KEYS[1], 'e', ARGV[2], 'p', ARGV[1], 'b', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  return ARGV[2]
end
return epoch or ''
"#;

/// Takes or renews a lease: the key holds the holder's node id for the lease's lifetime.
/// KEYS: the lease key. ARGV: node id, lifetime ms. Returns 1 when this node holds it.
pub const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// The set of nodes (node id scored by the time of its last advertisement, ms) and the key
/// holding one node's advertisement.
/// Like every cluster-level key, tagged `{P}` so one pipeline may touch them all.
pub fn nodes_key(prefix: &str) -> String {
    format!("{{{prefix}}}:nodes")
}

pub fn node_key(prefix: &str, id: &str) -> String {
    format!("{{{prefix}}}:node:{id}")
}

/// Gives a lease up if this node holds it. KEYS: the lease key. ARGV: node id.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The key of lease `name`.
pub fn lease_key(prefix: &str, name: &str) -> String {
    format!("{{{prefix}}}:lease:{name}")
}

/// One message as carried on a channel's topic.
#[derive(Debug, PartialEq, Eq)]
pub struct Carried<'a> {
    pub retained: bool,
    pub offset: u64,
    pub epoch: &'a str,
    pub data: &'a [u8],
}

/// Parses `r<offset>,<epoch>,<data>` (or `e...`); `None` for anything else.
pub fn parse_carried(payload: &[u8]) -> Option<Carried<'_>> {
    let (&mode, rest) = payload.split_first()?;
    let retained = match mode {
        b'r' => true,
        b'e' => false,
        _ => return None,
    };
    let comma = rest.iter().position(|b| *b == b',')?;
    let offset = std::str::from_utf8(&rest[..comma]).ok()?.parse().ok()?;
    let rest = &rest[comma + 1..];
    let comma = rest.iter().position(|b| *b == b',')?;
    let epoch = std::str::from_utf8(&rest[..comma]).ok()?;
    Some(Carried { retained, offset, epoch, data: &rest[comma + 1..] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = ChannelKeys::new("fc", "chat.a");
        assert_eq!(k.meta, "fc:m:{chat.a}");
        assert_eq!(k.stream, "fc:s:{chat.a}");
        assert_eq!(k.topic, "fc:p:chat.a");
    }

    #[test]
    fn carried_messages_parse() {
        let m = parse_carried(b"r12,abc,{\"x\":\"a,b\"}").unwrap();
        assert_eq!(
            m,
            Carried { retained: true, offset: 12, epoch: "abc", data: b"{\"x\":\"a,b\"}" }
        );
        assert!(!parse_carried(b"e3,abc,1").unwrap().retained);
        assert!(parse_carried(b"x1,a,1").is_none());
        assert!(parse_carried(b"r1a,b,1").is_none());
        assert!(parse_carried(b"r1").is_none());
    }
}
