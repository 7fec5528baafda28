//! Plain counters kept by the core. The media loop copies them into the
//! shared metrics after each batch, so the hot path pays for no atomics.

/// Counters since the core started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoreStats {
    /// Datagrams handed to the core.
    pub datagrams_in: u64,
    /// Bytes handed to the core.
    pub bytes_in: u64,
    /// RTP packets decrypted from peers.
    pub rtp_in: u64,
    /// RTP packets received from peers that are in no conversation.
    pub rtp_outside_conversation: u64,
    /// RTP packets written to subscribers.
    pub forwarded: u64,
    /// Datagrams dropped: not STUN/DTLS/RTP by their first byte, or unparsable.
    pub dropped_malformed: u64,
    /// Datagrams dropped: from an unknown address and not a STUN check for a known ufrag.
    pub dropped_unknown_source: u64,
    /// Datagrams a peer's `Rtc` refused.
    pub dropped_rejected: u64,
    /// Peers created from offers.
    pub peers_created: u64,
    /// Peers that completed ICE and DTLS.
    pub peers_connected: u64,
    /// Peers removed.
    pub peers_closed: u64,
    /// Connects refused at the peer limit.
    pub connects_refused: u64,
    /// Joins applied.
    pub joins: u64,
    /// Timer wakes that advanced a peer's `Rtc`.
    pub rtc_timeouts: u64,
    /// Bites finished.
    pub bites: u64,
    /// Times a conversation's slot mapping was rebuilt.
    pub speaker_changes: u64,
}
