//! Who is calling: the `X-User-Claim` header the auth proxy sets, JSON
//! `{"userid": "…", "clientid": "…"}`; in `--dev` only, `?userid=&clientid=`
//! in the query is accepted instead.

use serde::Deserialize;

use super::request::Request;
use crate::sfu::Claim;

/// Largest claim header accepted.
pub const MAX_CLAIM_BYTES: usize = 4096;
/// Longest user or client id accepted.
pub const MAX_ID_BYTES: usize = 256;

#[derive(Deserialize)]
struct RawClaim {
    userid: String,
    clientid: String,
}

/// The caller's claim, or why it is unusable (answered with 400).
pub fn from_request(req: &Request, dev: bool) -> Result<Claim, String> {
    let mut claims = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-user-claim"));
    let first = claims.next();
    if claims.next().is_some() {
        // The proxy must replace the header, not append to it: two of them
        // mean a client's own header got through.
        return Err("more than one X-User-Claim header".into());
    }
    let claim = match first {
        Some((_, raw)) => parse_header(raw)?,
        None if dev => match (req.query_param("userid"), req.query_param("clientid")) {
            (Some(userid), Some(clientid)) => Claim { userid, clientid },
            _ => {
                return Err(
                    "missing X-User-Claim header (or ?userid=&clientid= in dev mode)".into(),
                )
            }
        },
        None => return Err("missing X-User-Claim header".into()),
    };
    validate(claim)
}

/// Parses the header value.
pub fn parse_header(raw: &[u8]) -> Result<Claim, String> {
    if raw.len() > MAX_CLAIM_BYTES {
        return Err(format!(
            "X-User-Claim is larger than {MAX_CLAIM_BYTES} bytes"
        ));
    }
    let c: RawClaim = serde_json::from_slice(raw)
        .map_err(|e| format!("X-User-Claim is not JSON with string userid and clientid: {e}"))?;
    Ok(Claim {
        userid: c.userid,
        clientid: c.clientid,
    })
}

fn validate(c: Claim) -> Result<Claim, String> {
    for (name, v) in [("userid", &c.userid), ("clientid", &c.clientid)] {
        if v.trim().is_empty() {
            return Err(format!("claim {name} is empty"));
        }
        if v.len() > MAX_ID_BYTES {
            return Err(format!("claim {name} is longer than {MAX_ID_BYTES} bytes"));
        }
        if v.chars().any(char::is_control) {
            return Err(format!("claim {name} contains control characters"));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], query: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: "/connect".into(),
            query: query.map(str::to_string),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            leftover: vec![],
        }
    }

    #[test]
    fn header_claims() {
        let ok = from_request(
            &req(
                &[("x-user-claim", r#"{"userid":"u","clientid":"c","extra":1}"#)],
                None,
            ),
            false,
        );
        assert_eq!(
            ok,
            Ok(Claim {
                userid: "u".into(),
                clientid: "c".into()
            })
        );
        for bad in [
            r#"{"userid":"","clientid":"c"}"#,
            r#"{"userid":"u"}"#,
            "nope",
            r#"{"userid":1,"clientid":"c"}"#,
            r#"{"userid":" ","clientid":"c"}"#,
        ] {
            assert!(
                from_request(&req(&[("X-User-Claim", bad)], None), false).is_err(),
                "{bad}"
            );
        }
        let huge = format!(r#"{{"userid":"{}","clientid":"c"}}"#, "u".repeat(5000));
        assert!(from_request(&req(&[("X-User-Claim", &huge)], None), false)
            .unwrap_err()
            .contains("larger"));
        assert!(from_request(&req(&[], None), false)
            .unwrap_err()
            .contains("missing"));
    }

    #[test]
    fn query_claims_only_in_dev() {
        let r = req(&[], Some("userid=al%20ice&clientid=p"));
        assert!(from_request(&r, false).is_err());
        assert_eq!(from_request(&r, true).unwrap().userid, "al ice");
        assert!(from_request(&req(&[], Some("userid=a")), true).is_err());
    }
}
