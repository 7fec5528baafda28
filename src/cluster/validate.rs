//! What another node says is outside input even after it authenticated: a
//! node may be compromised. Every decoded message is checked here, on the
//! NATS thread, before it may reach the media loop: ids by the local rules,
//! payloads within the local media budget, counts per message, and stamps
//! within the stated clock skew. A message with any bad field is dropped
//! whole.

use std::fmt;

use prost::Message;

use super::seal::Kind;
use super::valid_node_id;
use crate::http::claims::MAX_ID_BYTES;
use crate::proto::cluster::{Heartbeat, Join, MediaBatch, Member, RelayedPacket};
use crate::sfu::ClusterInput;

/// Largest relayed payload: a local peer's own limit (`BudgetConfig`).
pub(crate) const MAX_RELAYED_PAYLOAD: usize = 1_500;
/// Most conversations or users one heartbeat message may name.
pub(crate) const MAX_HEARTBEAT_ITEMS: usize = 8_192;
/// Most packets in one media batch.
pub(crate) const MAX_BATCH_PACKETS: usize = 1_024;
/// Largest membership stamp accepted: a user would need 2^48 joins to
/// reach it, and a stamp near `u64::MAX` could otherwise pin a membership
/// (no later join could be newer).
pub(crate) const MAX_STAMP: u64 = 1 << 48;
/// Bytes a decoded item costs beyond its own strings (for the byte bound
/// on the loop's queue).
const ITEM_OVERHEAD: usize = 64;

/// Why a decoded message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// The body is not the protobuf its kind says.
    Undecodable,
    /// A user or conversation id is empty or over 256 bytes.
    BadId,
    /// A relayed payload is empty or over the local budget.
    PayloadSize,
    /// More items than one message may carry.
    TooMany,
    /// A membership stamp beyond [`MAX_STAMP`].
    StampOutOfRange,
    /// A join without its member.
    Empty,
}

impl Invalid {
    /// The `reason` label of `beep_sfu_cluster_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            Invalid::Undecodable => "undecodable",
            Invalid::BadId => "invalid_id",
            Invalid::PayloadSize => "invalid_payload_size",
            Invalid::TooMany => "too_many_items",
            Invalid::StampOutOfRange => "stamp_out_of_range",
            Invalid::Empty => "empty",
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A valid input for the core, and what it costs in the loop's queue.
pub(crate) struct Checked {
    /// For the core.
    pub input: ClusterInput,
    /// Approximate heap bytes it holds.
    pub cost: usize,
}

fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

fn member_ok(m: &Member) -> Result<(), Invalid> {
    if !id_ok(&m.userid) || !id_ok(&m.conversation) {
        return Err(Invalid::BadId);
    }
    if m.stamp > MAX_STAMP {
        return Err(Invalid::StampOutOfRange);
    }
    if !valid_node_id(&m.origin) {
        return Err(Invalid::BadId);
    }
    Ok(())
}

fn member_cost(m: &Member) -> usize {
    m.userid.len() + m.conversation.len() + ITEM_OVERHEAD
}

fn packet_ok(p: &RelayedPacket) -> Result<(), Invalid> {
    if !id_ok(&p.conversation) {
        return Err(Invalid::BadId);
    }
    if p.payload.is_empty() || p.payload.len() > MAX_RELAYED_PAYLOAD {
        return Err(Invalid::PayloadSize);
    }
    Ok(())
}

/// Decodes and checks the body of an authenticated message from `node`.
pub(crate) fn check(kind: Kind, node: &str, body: &[u8]) -> Result<Checked, Invalid> {
    match kind {
        Kind::Heartbeat => {
            let h = Heartbeat::decode(body).map_err(|_| Invalid::Undecodable)?;
            if h.goodbye {
                return Ok(Checked {
                    input: ClusterInput::Goodbye { node: node.into() },
                    cost: ITEM_OVERHEAD,
                });
            }
            if h.conversations.len() > MAX_HEARTBEAT_ITEMS || h.users.len() > MAX_HEARTBEAT_ITEMS {
                return Err(Invalid::TooMany);
            }
            if !h.conversations.iter().all(|c| id_ok(c)) {
                return Err(Invalid::BadId);
            }
            for m in &h.users {
                member_ok(m)?;
            }
            let cost = h
                .conversations
                .iter()
                .map(|c| c.len() + ITEM_OVERHEAD)
                .chain(h.users.iter().map(member_cost))
                .sum::<usize>()
                + ITEM_OVERHEAD;
            Ok(Checked {
                input: ClusterInput::Heartbeat {
                    node: node.into(),
                    conversations: h.conversations,
                    users: h.users,
                    first: !h.continued,
                    last: !h.more,
                },
                cost,
            })
        }
        Kind::Join => {
            let j = Join::decode(body).map_err(|_| Invalid::Undecodable)?;
            let m = j.member.ok_or(Invalid::Empty)?;
            member_ok(&m)?;
            let cost = member_cost(&m);
            Ok(Checked {
                input: ClusterInput::Join(m),
                cost,
            })
        }
        Kind::Media => {
            let b = MediaBatch::decode(body).map_err(|_| Invalid::Undecodable)?;
            if b.packets.len() > MAX_BATCH_PACKETS {
                return Err(Invalid::TooMany);
            }
            for p in &b.packets {
                packet_ok(p)?;
            }
            let cost = b
                .packets
                .iter()
                .map(|p| p.payload.len() + p.conversation.len() + ITEM_OVERHEAD)
                .sum::<usize>()
                + ITEM_OVERHEAD;
            Ok(Checked {
                input: ClusterInput::Media {
                    node: node.into(),
                    packets: b.packets,
                },
                cost,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(userid: &str, conversation: &str, stamp: u64) -> Member {
        Member {
            userid: userid.into(),
            conversation: conversation.into(),
            stamp,
            origin: "b".into(),
        }
    }

    fn packet(len: usize) -> RelayedPacket {
        RelayedPacket {
            conversation: "c".into(),
            payload: vec![0xF8; len],
            ..Default::default()
        }
    }

    fn media(packets: Vec<RelayedPacket>) -> Vec<u8> {
        MediaBatch { packets }.encode_to_vec()
    }

    #[test]
    fn payloads_over_the_local_budget_are_refused() {
        assert!(check(Kind::Media, "a", &media(vec![packet(1_500)])).is_ok());
        let r = check(Kind::Media, "a", &media(vec![packet(1_500), packet(2_000)]));
        assert_eq!(r.err(), Some(Invalid::PayloadSize));
        let r = check(Kind::Media, "a", &media(vec![packet(0)]));
        assert_eq!(r.err(), Some(Invalid::PayloadSize));
        let many = vec![packet(10); MAX_BATCH_PACKETS + 1];
        assert_eq!(
            check(Kind::Media, "a", &media(many)).err(),
            Some(Invalid::TooMany)
        );
    }

    #[test]
    fn ids_and_stamps_follow_the_local_rules() {
        let join = |m: Member| Join { member: Some(m) }.encode_to_vec();
        assert!(check(Kind::Join, "a", &join(member("u", "c", 1))).is_ok());
        let long = "x".repeat(257);
        for bad in [
            member("", "c", 1),
            member("u", "", 1),
            member(&long, "c", 1),
        ] {
            assert_eq!(
                check(Kind::Join, "a", &join(bad)).err(),
                Some(Invalid::BadId)
            );
        }
        let pinned = member("u", "c", u64::MAX);
        assert_eq!(
            check(Kind::Join, "a", &join(pinned)).err(),
            Some(Invalid::StampOutOfRange)
        );
        let empty = Join { member: None }.encode_to_vec();
        assert_eq!(check(Kind::Join, "a", &empty).err(), Some(Invalid::Empty));
        assert_eq!(
            check(Kind::Heartbeat, "a", b"\xff\xff\xff").err(),
            Some(Invalid::Undecodable)
        );
    }

    #[test]
    fn a_heartbeat_names_its_parts_and_is_bounded() {
        let hb = Heartbeat {
            conversations: vec!["c".into()],
            users: vec![member("u", "c", 1)],
            continued: true,
            more: false,
            ..Default::default()
        };
        match check(Kind::Heartbeat, "a", &hb.encode_to_vec()).map(|c| c.input) {
            Ok(ClusterInput::Heartbeat { first, last, .. }) => assert!(!first && last),
            other => panic!("{:?}", other.err()),
        }
        let huge = Heartbeat {
            conversations: vec!["c".into(); MAX_HEARTBEAT_ITEMS + 1],
            ..Default::default()
        };
        assert_eq!(
            check(Kind::Heartbeat, "a", &huge.encode_to_vec()).err(),
            Some(Invalid::TooMany)
        );
    }
}
