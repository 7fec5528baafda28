//! Plain counters kept by the core, and the one [`Snapshot`] the driver
//! reads for metrics and health. The media loop copies them into the shared
//! metrics now and then, so the hot path pays for no atomics.
//!
//! Each counter is declared once, with where it is exported; the metrics
//! module registers and publishes them from that table, so adding a counter
//! here is all it takes to see it on `/metrics`.

/// Where a core counter appears on `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Export {
    /// Its own counter: `beep_sfu_<name>_total`.
    Counter {
        /// Metric name without prefix and suffix.
        name: &'static str,
        /// Help text.
        help: &'static str,
    },
    /// `beep_sfu_dropped_datagrams_total{reason=…}`.
    Dropped(&'static str),
    /// `beep_sfu_peer_events_total{reason=…}`.
    PeerEvent(&'static str),
}

macro_rules! core_stats {
    ($( $(#[doc = $doc:literal])* $field:ident => $export:expr; )*) => {
        /// Counters since the core started.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct CoreStats {
            $( $(#[doc = $doc])* pub $field: u64, )*
        }

        impl CoreStats {
            /// Where each counter is exported, in field order.
            pub(crate) const EXPORTS: &'static [Export] = &[$($export),*];

            /// The counters' values, in the order of [`CoreStats::EXPORTS`].
            pub(crate) fn values(&self) -> impl Iterator<Item = u64> {
                [$(self.$field),*].into_iter()
            }
        }
    };
}

use Export::{Counter, Dropped, PeerEvent};

core_stats! {
    /// Datagrams handed to the core.
    datagrams_in => Counter { name: "datagrams_in", help: "Datagrams received on the media socket" };
    /// Bytes handed to the core.
    bytes_in => Counter { name: "bytes_in", help: "Bytes received on the media socket" };
    /// RTP packets decrypted from peers.
    rtp_in => Counter { name: "rtp_packets_in", help: "RTP packets received from peers" };
    /// RTP packets written to subscribers.
    forwarded => Counter { name: "forwarded_packets", help: "RTP packets forwarded to subscribers" };
    /// Timer wakes that advanced a peer's `Rtc`.
    rtc_timeouts => Counter { name: "rtc_timeouts", help: "Timer wakes that advanced a peer's WebRTC state" };
    /// Joins applied.
    joins => Counter { name: "joins", help: "Joins applied by the media loop" };
    /// Times a conversation's slot mapping was rebuilt.
    speaker_changes => Counter { name: "slot_reassignments", help: "Times a conversation's slot mapping was rebuilt (speaker or membership changes)" };
    /// Packets a bite dropped as duplicate or out of order.
    bite_packets_late => Counter { name: "bite_packets_late", help: "Packets left out of a bite as duplicate or out of order" };
    /// Datagrams dropped: not STUN/DTLS/RTP by their first byte, or unparsable.
    dropped_malformed => Dropped("malformed");
    /// Datagrams dropped: from an unknown address and not a STUN check for a known ufrag.
    dropped_unknown_source => Dropped("unknown_source");
    /// Datagrams a peer's `Rtc` refused.
    dropped_rejected => Dropped("rejected_by_peer");
    /// RTP packets received from peers that are in no conversation.
    rtp_outside_conversation => Dropped("outside_conversation");
    /// RTP packets on a peer's second (or later) sending m-line.
    dropped_not_source => Dropped("not_source_mline");
    /// RTP packets whose payload type is not Opus.
    dropped_not_opus => Dropped("not_opus");
    /// RED packets received from speakers (admitted, before unwrapping).
    red_in => Counter { name: "red_packets_in", help: "RTP packets received from speakers wrapped in RED (RFC 2198)" };
    /// RED packets whose blocks do not check out (structure, block count, codec, offsets).
    dropped_red_malformed => Dropped("red_malformed");
    /// Packets an uplink lost that the next packet's RED redundancy carried.
    red_recovered => Counter { name: "red_recovered_packets", help: "Packets lost on a speaker's uplink and recovered from the RED redundancy of the packets after them (forwarded and kept in bites)" };
    /// RED packets written to listeners that negotiated RED.
    red_written => Counter { name: "red_packets_written", help: "RTP packets written to listeners as RED (RFC 2198), with their speaker's previous packets as redundancy" };
    /// RTP packets over the peer's packet rate.
    dropped_over_packet_rate => Dropped("over_packet_rate");
    /// RTP packets over the peer's byte rate.
    dropped_over_byte_rate => Dropped("over_byte_rate");
    /// RTP packets with a payload over the size cap.
    dropped_payload_too_big => Dropped("payload_too_big");
    /// Packets of local speakers handed out for other nodes.
    relay_packets_out => Counter { name: "relay_packets_out", help: "Packets of local speakers relayed to other nodes of the cluster" };
    /// Payload bytes of those.
    relay_bytes_out => Counter { name: "relay_bytes_out", help: "Payload bytes relayed to other nodes" };
    /// Packets of remote speakers received from other nodes.
    relay_packets_in => Counter { name: "relay_packets_in", help: "Packets of remote speakers received from other nodes" };
    /// Payload bytes of those.
    relay_bytes_in => Counter { name: "relay_bytes_in", help: "Payload bytes received from other nodes" };
    /// Relayed packets for a conversation this node does not have.
    relay_dropped_no_conversation => Dropped("relayed_for_unknown_conversation");
    /// Relayed packets refused: over the remote speaker's media budget.
    relay_dropped_over_budget => Dropped("relayed_over_budget");
    /// Relayed packets refused: their node has the most speakers allowed.
    relay_dropped_too_many_speakers => Dropped("relayed_too_many_speakers");
    /// Relayed packets refused: from a node beyond the node cap.
    relay_dropped_too_many_nodes => Dropped("relayed_too_many_nodes");
    /// Heartbeats from nodes beyond the node cap.
    cluster_nodes_refused => Counter { name: "cluster_nodes_refused", help: "Heartbeats ignored because the cluster already has the most nodes allowed" };
    /// Relayed packets whose write panicked inside str0m (the listener was closed).
    forward_panics => Counter { name: "forward_panics", help: "Packet writes that panicked inside the WebRTC stack (the listener was closed, the process went on)" };
    /// Peers created from offers.
    peers_created => PeerEvent("created");
    /// Peers that completed ICE and DTLS.
    peers_connected => PeerEvent("connected");
    /// Peers removed.
    peers_closed => PeerEvent("closed");
    /// Connects refused at a peer limit.
    connects_refused => PeerEvent("refused_full");
}

/// Everything the driver reports about the core, read in one call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Counters since start.
    pub stats: CoreStats,
    /// Peers, connecting or connected.
    pub peers: usize,
    /// Connected peers.
    pub connected: usize,
    /// Conversations with members or joined users.
    pub conversations: usize,
    /// Bites being assembled.
    pub open_bites: usize,
    /// Other nodes of the cluster this one hears.
    pub cluster_nodes: usize,
    /// Speakers on other nodes currently known.
    pub remote_speakers: usize,
}
