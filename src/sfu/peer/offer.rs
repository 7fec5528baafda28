//! Reading SDP text before and after str0m: the cheap pre-check of an offer
//! (size, an audio m-line with Opus) and the audio m-lines of an answer.
//! One line scanner serves both.

use str0m::media::Mid;

use crate::sfu::api::{ConnectError, OfferError};

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
