//! An offer becomes a peer: the cheap pre-check of the offer text (size, an
//! audio m-line with Opus), str0m's accept behind a panic guard, and the
//! slots and sources read from the answer's audio m-lines. One line scanner
//! reads both SDPs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use str0m::change::SdpOffer;
use str0m::media::Mid;
use str0m::{Candidate, RtcConfig};

use super::budget::{Budget, BudgetConfig};
use super::slot::Slot;
use super::{Limits, Peer, MAX_SLOTS};
use crate::sfu::api::{Claim, ConnectError, InternalError, OfferError};
use crate::sfu::conversation::speaker::speaker_csrc;
use crate::sfu::ids::PeerId;

/// Longest accepted SDP offer.
pub const MAX_OFFER_BYTES: usize = 64 * 1024;

/// One audio m-line as the SDP text describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AudioMline {
    /// Its `a=mid:` (a zero-length mid when it has none).
    pub mid: Mid,
    /// True if an `a=rtpmap:` in it names `opus/48000`.
    pub has_opus: bool,
}

/// The audio m-lines of an SDP, in order.
pub(crate) fn audio_mlines(sdp: &str) -> Vec<AudioMline> {
    let mut out: Vec<AudioMline> = Vec::new();
    let mut in_audio = false;
    for line in sdp.lines() {
        let line = line.trim();
        if let Some(m) = line.strip_prefix("m=") {
            in_audio = m.starts_with("audio ");
            if in_audio {
                out.push(AudioMline {
                    mid: Mid::from(""),
                    has_opus: false,
                });
            }
        } else if !in_audio {
            continue;
        } else if let (Some(mid), Some(last)) = (line.strip_prefix("a=mid:"), out.last_mut()) {
            last.mid = Mid::from(mid);
        } else if let (Some(rest), Some(last)) = (line.strip_prefix("a=rtpmap:"), out.last_mut()) {
            let codec = rest.split_whitespace().nth(1).unwrap_or("");
            if codec.to_ascii_lowercase().starts_with("opus/48000") {
                last.has_opus = true;
            }
        }
    }
    out
}

/// Cheap checks on an offer before str0m parses it: size, `v=0`, and an
/// audio m-line with Opus.
pub(crate) fn check(offer: &str) -> Result<(), ConnectError> {
    if offer.len() > MAX_OFFER_BYTES {
        return Err(ConnectError::MalformedOffer(OfferError::TooLarge {
            len: offer.len(),
            limit: MAX_OFFER_BYTES,
        }));
    }
    if !offer.trim_start().starts_with("v=0") {
        return Err(ConnectError::MalformedOffer(OfferError::NotSdp));
    }
    if audio_mlines(offer).iter().any(|m| m.has_opus) {
        Ok(())
    } else {
        Err(ConnectError::NoOpus)
    }
}

/// What every new peer is built with besides its offer.
pub(crate) struct Setup<'a> {
    /// Settings shared by every `Rtc` (with the one DTLS certificate).
    pub rtc_config: &'a RtcConfig,
    /// The server's host candidates.
    pub candidates: Vec<Candidate>,
    /// Connect and idle timeouts.
    pub limits: Limits,
    /// The media budget of each peer.
    pub budget: BudgetConfig,
}

impl Peer {
    /// Builds a peer from a client's offer; returns it with the answer SDP.
    /// `ufrag_taken` says whether a server ufrag is already routed elsewhere.
    pub fn accept(
        now: Instant,
        id: PeerId,
        claim: Claim,
        offer: SdpOffer,
        setup: Setup<'_>,
        ufrag_taken: impl Fn(&str) -> bool,
    ) -> Result<(Peer, String), ConnectError> {
        let Setup {
            rtc_config,
            candidates,
            limits,
            budget,
        } = setup;
        let rtc_config = rtc_config.clone();
        let built = catch_unwind(AssertUnwindSafe(move || {
            let mut rtc = rtc_config.build(now);
            for c in candidates {
                rtc.add_local_candidate(c);
            }
            let answer = rtc.sdp_api().accept_offer(offer);
            (rtc, answer)
        }));
        let (mut rtc, answer) =
            built.map_err(|_| ConnectError::Internal(InternalError::StackPanicked))?;
        let answer =
            answer.map_err(|e| ConnectError::MalformedOffer(OfferError::Refused(e.to_string())))?;
        let mut ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        while ufrag_taken(&ufrag) {
            let creds = str0m::IceCreds::new();
            ufrag = creds.ufrag.clone();
            rtc.direct_api().set_local_ice_credentials(creds);
        }
        let answer = answer.to_sdp_string();
        // Slots and sources come from the negotiated audio m-lines.
        let mut slots = Vec::new();
        let mut sending_mlines = 0;
        let mut source_mid = None;
        for mline in audio_mlines(&answer) {
            let Some(media) = rtc.media(mline.mid) else {
                continue;
            };
            let dir = media.direction();
            if dir.is_sending() && slots.len() < MAX_SLOTS {
                slots.push(Slot::new(mline.mid, rand::random(), rand::random()));
            }
            if dir.is_receiving() {
                sending_mlines += 1;
                source_mid.get_or_insert(mline.mid);
            }
        }
        if slots.is_empty() && sending_mlines == 0 {
            return Err(ConnectError::NoOpus);
        }
        let csrc = speaker_csrc(&claim.userid);
        let peer = Peer {
            id,
            claim,
            rtc,
            ufrag,
            addrs: Vec::new(),
            slots,
            sending_mlines,
            csrc,
            source_mid,
            budget: Budget::new(budget, now),
            connected: false,
            limits,
            connect_at: Some(now + limits.connect),
            last_rx: now,
            rtc_at: now,
            armed: None,
        };
        Ok((peer, answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_text_checks() {
        assert!(matches!(
            check("hello"),
            Err(ConnectError::MalformedOffer(_))
        ));
        assert_eq!(
            check("v=0\r\nm=video 9 UDP 96\r\na=rtpmap:96 VP8/90000\r\n"),
            Err(ConnectError::NoOpus)
        );
        assert_eq!(
            check("v=0\r\nm=audio 9 UDP 0\r\na=rtpmap:0 PCMU/8000\r\n"),
            Err(ConnectError::NoOpus)
        );
        assert_eq!(
            check("v=0\r\nm=audio 9 UDP 111\r\na=rtpmap:111 opus/48000/2\r\n"),
            Ok(())
        );
        let huge = format!("v=0\r\n{}", "a".repeat(MAX_OFFER_BYTES));
        assert!(matches!(check(&huge), Err(ConnectError::MalformedOffer(_))));
    }

    #[test]
    fn audio_mlines_in_order_with_their_mids() {
        let sdp = "v=0\r\nm=audio 9 UDP 111\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\n\
                   m=video 9 UDP 96\r\na=mid:1\r\na=rtpmap:96 opus/48000/2\r\n\
                   m=audio 9 UDP 0\r\na=mid:2\r\na=rtpmap:0 PCMU/8000\r\n";
        let m = audio_mlines(sdp);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].mid, m[0].has_opus), (Mid::from("0"), true));
        assert_eq!((m[1].mid, m[1].has_opus), (Mid::from("2"), false));
    }
}
