//! The text messages spoken on the `/connect` WebSocket, as pure functions.
//!
//! The client's first frame is the offer in one of three styles: raw SDP
//! (`v=0…`), `offer::` + SDP, or JSON `{"type":"offer","sdp":"…"}`. The answer
//! goes back in the same style. Later frames carry trickled candidates:
//! `ice::` + candidate, or JSON `{"candidate": "…"}` (also the browser's
//! `RTCIceCandidate` object form `{"candidate": {"candidate": "…", …}}`).

use serde_json::Value;

/// How the client wrote its offer, so the answer is written the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// Bare SDP text.
    Raw,
    /// `offer::` / `answer::` prefixes.
    Prefixed,
    /// JSON `{"type":…, "sdp":…}`.
    Json,
}

/// One message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientMessage {
    /// The SDP offer.
    Offer {
        /// SDP text.
        sdp: String,
        /// How it was written.
        style: Style,
    },
    /// A trickled ICE candidate (empty = end of candidates).
    Candidate(String),
}

/// Parses one text frame from the client.
pub(crate) fn parse_client_message(text: &str) -> Result<ClientMessage, String> {
    let t = text.trim_start();
    if t.starts_with("v=0") {
        return Ok(ClientMessage::Offer {
            sdp: text.to_string(),
            style: Style::Raw,
        });
    }
    if let Some(sdp) = t.strip_prefix("offer::") {
        return Ok(ClientMessage::Offer {
            sdp: sdp.to_string(),
            style: Style::Prefixed,
        });
    }
    if let Some(c) = t.strip_prefix("ice::") {
        return Ok(ClientMessage::Candidate(c.trim().to_string()));
    }
    if t.starts_with('{') {
        let v: Value = serde_json::from_str(t).map_err(|e| format!("invalid JSON: {e}"))?;
        if let Some(c) = v.get("candidate") {
            return match c {
                Value::String(s) => Ok(ClientMessage::Candidate(s.trim().to_string())),
                Value::Object(o) => match o.get("candidate") {
                    Some(Value::String(s)) => Ok(ClientMessage::Candidate(s.trim().to_string())),
                    _ => Err("candidate object has no \"candidate\" string".into()),
                },
                Value::Null => Ok(ClientMessage::Candidate(String::new())),
                _ => Err("\"candidate\" must be a string".into()),
            };
        }
        return match (
            v.get("type").and_then(Value::as_str),
            v.get("sdp").and_then(Value::as_str),
        ) {
            (Some("offer"), Some(sdp)) => Ok(ClientMessage::Offer {
                sdp: sdp.to_string(),
                style: Style::Json,
            }),
            (Some("offer"), None) => Err("offer has no \"sdp\" string".into()),
            (Some(other), _) => Err(format!("unexpected message type {other:?}")),
            (None, _) => Err("JSON message has neither \"type\" nor \"candidate\"".into()),
        };
    }
    Err("expected an SDP offer (v=0…, offer::…, or JSON) or a candidate (ice::…)".into())
}

/// Writes the answer in the client's style.
pub(crate) fn format_answer(style: Style, sdp: &str) -> String {
    match style {
        Style::Raw => sdp.to_string(),
        Style::Prefixed => format!("answer::{sdp}"),
        Style::Json => serde_json::json!({"type": "answer", "sdp": sdp}).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_offer_styles() {
        assert_eq!(
            parse_client_message("v=0\r\nx"),
            Ok(ClientMessage::Offer {
                sdp: "v=0\r\nx".into(),
                style: Style::Raw
            })
        );
        assert_eq!(
            parse_client_message("offer::v=0\r\n"),
            Ok(ClientMessage::Offer {
                sdp: "v=0\r\n".into(),
                style: Style::Prefixed
            })
        );
        assert_eq!(
            parse_client_message(r#"{"type":"offer","sdp":"v=0"}"#),
            Ok(ClientMessage::Offer {
                sdp: "v=0".into(),
                style: Style::Json
            })
        );
    }

    #[test]
    fn candidates() {
        assert_eq!(
            parse_client_message("ice::candidate:1 1 udp 1 1.2.3.4 5 typ host"),
            Ok(ClientMessage::Candidate(
                "candidate:1 1 udp 1 1.2.3.4 5 typ host".into()
            ))
        );
        assert_eq!(
            parse_client_message(r#"{"candidate":"candidate:x"}"#),
            Ok(ClientMessage::Candidate("candidate:x".into()))
        );
        assert_eq!(
            parse_client_message(r#"{"candidate":{"candidate":"candidate:y","sdpMid":"0"}}"#),
            Ok(ClientMessage::Candidate("candidate:y".into()))
        );
        assert_eq!(
            parse_client_message(r#"{"candidate":null}"#),
            Ok(ClientMessage::Candidate(String::new()))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "hello",
            "{",
            "{}",
            r#"{"type":"answer","sdp":"v=0"}"#,
            r#"{"type":"offer"}"#,
            r#"{"candidate":5}"#,
            "[1,2]",
            "\u{0}",
        ] {
            assert!(parse_client_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn answers_mirror_the_style() {
        assert_eq!(format_answer(Style::Raw, "v=0"), "v=0");
        assert_eq!(format_answer(Style::Prefixed, "v=0"), "answer::v=0");
        let v: Value = serde_json::from_str(&format_answer(Style::Json, "v=0\r\n")).unwrap();
        assert_eq!(v["type"], "answer");
        assert_eq!(v["sdp"], "v=0\r\n");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of a few nasty inputs and
        // pseudo-random strings.
        let mut seed = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let s: String = (0..len)
                .map(|i| {
                    let c = (seed.rotate_left(i as u32 * 7) & 0x7f) as u8;
                    [
                        '{',
                        '}',
                        '"',
                        ':',
                        'v',
                        '=',
                        '0',
                        'i',
                        'c',
                        'e',
                        char::from(c),
                    ][(c % 11) as usize]
                })
                .collect();
            let _ = parse_client_message(&s);
        }
    }
}
