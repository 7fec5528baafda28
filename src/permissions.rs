//! Asks Beep's permissions service whether a user may join a conversation:
//! `GET {host}/user/{userid}/conversation/{conversationid}`, 200 = allowed.
//!
//! Blocking (`ureq`), so it runs on signalling threads, never on the media
//! loop. Both path segments are percent-encoded (a user id of `../admin`
//! cannot change the path), redirects are not followed, and a slow or
//! unreachable service fails the join closed.

use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ureq::Agent;

/// Everything but the RFC 3986 unreserved characters other than `.` is
/// encoded; `.` is encoded too so `..` can never be a path segment.
pub(crate) const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

/// The answer of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 200: the user may join.
    Allowed,
    /// Any other status.
    Denied(u16),
    /// No answer within the timeout, or no connection (text says why).
    Unavailable(String),
}

impl Decision {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied(_) => "denied",
            Decision::Unavailable(_) => "unavailable",
        }
    }
}

/// A client of the permissions service.
#[derive(Clone)]
pub struct PermissionClient {
    base: String,
    agent: Agent,
}

impl PermissionClient {
    /// A client for `base` (e.g. `http://permissions`) with a total timeout per check.
    pub fn new(base: &str, timeout: Duration) -> Self {
        let agent: Agent = Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into();
        PermissionClient {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }

    /// The URL checked for this user and conversation.
    pub fn url(&self, userid: &str, conversation: &str) -> String {
        format!(
            "{}/user/{}/conversation/{}",
            self.base,
            utf8_percent_encode(userid, SEGMENT),
            utf8_percent_encode(conversation, SEGMENT)
        )
    }

    /// Asks the service; returns the decision and how long it took.
    pub fn check(&self, userid: &str, conversation: &str) -> (Decision, Duration) {
        let start = Instant::now();
        let decision = match self.agent.get(&self.url(userid, conversation)).call() {
            Ok(resp) if resp.status().as_u16() == 200 => Decision::Allowed,
            Ok(resp) => Decision::Denied(resp.status().as_u16()),
            Err(e) => Decision::Unavailable(e.to_string()),
        };
        (decision, start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_cannot_escape() {
        let c = PermissionClient::new("http://permissions/", Duration::from_secs(1));
        assert_eq!(
            c.url("../admin", "c 1/x"),
            "http://permissions/user/%2E%2E%2Fadmin/conversation/c%201%2Fx"
        );
        assert_eq!(
            c.url("ab-c_d~", "é"),
            "http://permissions/user/ab-c_d~/conversation/%C3%A9"
        );
        assert_eq!(
            c.url("..", "?a=b#c"),
            "http://permissions/user/%2E%2E/conversation/%3Fa%3Db%23c"
        );
    }
}
