//! A WebRTC client as the tests, benchmarks and load generator use it: a
//! str0m `Rtc` in RTP mode with Opus only (and RED, RFC 2198, if asked),
//! one host candidate, an offer of one send-receive audio m-line plus
//! receive-only ones, and a `send` that writes one 20 ms packet with its own
//! sequence numbers and timestamps.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive, TcpType, Transmit};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use crate::sfu::opus::FRAME_TICKS;

/// What the client produced.
#[derive(Debug)]
pub enum ClientOutput {
    /// A datagram to deliver.
    Transmit(Transmit),
    /// ICE and DTLS are up.
    Connected,
    /// A decrypted packet, with the m-line it arrived on.
    Rtp(Mid, Box<RtpPacket>),
}

/// One Opus client.
pub struct OpusClient {
    rtc: Rtc,
    addr: SocketAddr,
    send_mid: Option<Mid>,
    pending: Option<SdpPendingOffer>,
    pt: Option<Pt>,
    red: bool,
    seq: u64,
    timestamp: u32,
    /// When the client's `Rtc` last asked to be woken.
    next_timeout: Option<Instant>,
}

impl OpusClient {
    /// A client whose one host candidate is `addr`, over UDP.
    pub fn new(addr: SocketAddr, now: Instant) -> Result<Self, String> {
        let c = Candidate::host(addr, "udp").map_err(|e| e.to_string())?;
        Self::with_candidate(addr, c, now, false)
    }

    /// A UDP client that offers RED (`red/48000/2`) beside Opus, as
    /// Chromium does.
    pub fn new_red(addr: SocketAddr, now: Instant) -> Result<Self, String> {
        let c = Candidate::host(addr, "udp").map_err(|e| e.to_string())?;
        Self::with_candidate(addr, c, now, true)
    }

    /// A client that reaches the server over TCP only (an active ICE-TCP
    /// candidate at `addr`): what a client on a UDP-blocking network offers.
    pub fn new_tcp(addr: SocketAddr, now: Instant) -> Result<Self, String> {
        let c = Candidate::builder()
            .tcp()
            .host(addr)
            .tcptype(TcpType::Active)
            .build()
            .map_err(|e| e.to_string())?;
        Self::with_candidate(addr, c, now, false)
    }

    fn with_candidate(
        addr: SocketAddr,
        candidate: Candidate,
        now: Instant,
        red: bool,
    ) -> Result<Self, String> {
        let mut rtc = RtcConfig::new()
            .clear_codecs()
            .enable_opus(true, red)
            .set_rtp_mode(true)
            .set_stats_interval(None)
            .build(now);
        rtc.add_local_candidate(candidate);
        Ok(OpusClient {
            rtc,
            addr,
            send_mid: None,
            pending: None,
            pt: None,
            red,
            seq: 0,
            timestamp: 0,
            next_timeout: None,
        })
    }

    /// The client's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The m-line it sends on, once offered.
    pub fn send_mid(&self) -> Option<Mid> {
        self.send_mid
    }

    /// The underlying `Rtc`, for what the kit does not wrap (closing it).
    pub fn rtc_mut(&mut self) -> &mut Rtc {
        &mut self.rtc
    }

    /// An offer of one send-receive audio m-line (if `send`) plus `recv_only`
    /// receive-only ones, as SDP text.
    pub fn offer(&mut self, send: bool, recv_only: usize) -> Result<String, String> {
        let mut api = self.rtc.sdp_api();
        if send {
            self.send_mid =
                Some(api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None));
        }
        for _ in 0..recv_only {
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        }
        let (offer, pending) = api.apply().ok_or("no media to offer")?;
        self.pending = Some(pending);
        Ok(offer.to_sdp_string())
    }

    /// Applies the server's answer to the last offer.
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), String> {
        let pending = self.pending.take().ok_or("no offer is pending")?;
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| e.to_string())?;
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| e.to_string())
    }

    /// Writes one 20 ms Opus packet with an RFC 6464 level (`-127..=0`).
    /// Returns false if the client has no send m-line or no Opus yet.
    pub fn send(&mut self, payload: &[u8], level: i8, now: Instant) -> bool {
        match self.opus_pt() {
            Some(pt) => self.send_as(pt, payload, level, now),
            None => false,
        }
    }

    /// The negotiated Opus payload type.
    pub fn opus_pt(&mut self) -> Option<Pt> {
        if self.pt.is_none() {
            self.pt = self
                .rtc
                .codec_config()
                .params()
                .iter()
                .find(|p| p.spec().codec == Codec::Opus)
                .map(|p| p.pt());
        }
        self.pt
    }

    /// The negotiated RED payload type, if this client offered RED and the
    /// server answered it.
    pub fn red_pt(&mut self) -> Option<Pt> {
        if !self.red {
            return None;
        }
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Opus)
            .and_then(|p| p.red())
    }

    /// Writes one 20 ms packet of payload type `pt` (for RED: a payload the
    /// caller wrapped), advancing the sequence number and timestamp.
    pub fn send_as(&mut self, pt: Pt, payload: &[u8], level: i8, now: Instant) -> bool {
        let Some(mid) = self.send_mid else {
            return false;
        };
        let ext = ExtensionValues {
            audio_level: Some(level),
            voice_activity: Some(level > -127),
            ..Default::default()
        };
        let (seq, ts) = (self.seq, self.timestamp);
        self.seq += 1;
        self.timestamp = self.timestamp.wrapping_add(FRAME_TICKS);
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        tx.write_rtp(RtpWrite::new(pt, SeqNo::from(seq), ts, now, payload.to_vec()).ext_vals(ext));
        // Release it through the pacer at once.
        let _ = self.rtc.handle_input(Input::Timeout(now));
        true
    }

    /// Feeds a datagram from `source`.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, buf: &[u8]) {
        self.handle_receive(now, Protocol::Udp, source, buf);
    }

    /// Feeds a datagram of `proto` (one RFC 4571 frame for TCP) from `source`.
    pub fn handle_receive(
        &mut self,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        buf: &[u8],
    ) {
        if let Ok(r) = Receive::new(proto, source, self.addr, buf) {
            let _ = self.rtc.handle_input(Input::Receive(now, r));
        }
    }

    /// Advances time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = self.rtc.handle_input(Input::Timeout(now));
    }

    /// When the client must next be handed the time (as of its last drain).
    pub fn next_timeout(&self) -> Option<Instant> {
        self.next_timeout
    }

    /// The next output; `None` when the client is idle until its timeout.
    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        loop {
            match self.rtc.poll_output().ok()? {
                Output::Timeout(t) => {
                    self.next_timeout = Some(t);
                    return None;
                }
                Output::Transmit(t) => return Some(ClientOutput::Transmit(t)),
                Output::Event(Event::Connected) => return Some(ClientOutput::Connected),
                Output::Event(Event::RtpPacket(p)) => {
                    let mid = self
                        .rtc
                        .direct_api()
                        .stream_rx(&p.header.ssrc)
                        .map(|s| s.mid())
                        .unwrap_or_else(|| Mid::from("?"));
                    return Some(ClientOutput::Rtp(mid, Box::new(p)));
                }
                Output::Event(_) => {}
            }
        }
    }
}
