//! `POST /join/:conversationid`: check the caller's permission, then move
//! all the user's clients into the conversation.

use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use log::{info, warn};
use percent_encoding::percent_decode_str;

use super::claims;
use super::request::Request as HttpRequest;
use super::response::Response;
use super::Context;
use crate::command::{Command, SendError};
use crate::permissions::Decision;
use crate::sfu::{JoinError, Reply, Request};
use std::time::Instant;

use crate::log_limit::LogLimit;

/// Refused joins are logged at most once a second (a client may retry in a
/// loop), with the number left out.
static DENIED: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));
/// The permissions service being down is logged at most once a second.
static UNAVAILABLE: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));

/// Longest conversation id accepted, in bytes.
pub const MAX_CONVERSATION_BYTES: usize = 256;
/// How long to wait for the media loop to apply a join.
const LOOP_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Handles the request; `rest` is the path after `/join`.
pub fn serve(req: &HttpRequest, ctx: &Context, rest: &str) -> Response {
    let claim = match claims::from_request(req, ctx.dev) {
        Ok(c) => c,
        Err(e) => return Response::text(400, e),
    };
    let conversation = match conversation_id(rest) {
        Ok(c) => c,
        Err(e) => return Response::text(400, e),
    };
    match &ctx.permissions {
        None => {}
        Some(p) => {
            let (decision, took) = p.check(&claim.userid, &conversation);
            ctx.metrics.permission(decision.label(), took);
            match decision {
                Decision::Allowed => {}
                Decision::Denied(status) => {
                    DENIED.log(Instant::now(), |more| {
                        info!(
                            "join refused: user {} may not join {conversation} (permissions answered {status}; {more} more refused since the last line)",
                            claim.userid
                        )
                    });
                    return Response::text(401, "permission to join this conversation was denied");
                }
                Decision::Unavailable(why) => {
                    UNAVAILABLE.log(Instant::now(), |more| {
                        warn!(
                            "permissions service unavailable for user {}: {why} ({more} more since the last line)",
                            claim.userid
                        )
                    });
                    return Response::text(503, format!("permissions service unavailable: {why}"))
                        .header("Retry-After", "1");
                }
            }
        }
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let cmd = Command {
        request: Request::Join {
            userid: claim.userid.clone(),
            conversation: conversation.clone(),
        },
        reply: Some(tx),
        notices: None,
    };
    match ctx.handle.send(cmd) {
        Ok(()) => {}
        Err(SendError::Full) => {
            return Response::text(503, "server busy; retry shortly").header("Retry-After", "1")
        }
        Err(SendError::Stopped) => return Response::text(503, "server is shutting down"),
    }
    match rx.recv_timeout(LOOP_REPLY_TIMEOUT) {
        Ok(Reply::Join(Ok(()))) => Response::text(200, ""),
        Ok(Reply::Join(Err(JoinError::ShuttingDown))) => {
            Response::text(503, "server is shutting down")
        }
        Ok(_) | Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
            Response::text(503, "media loop did not answer in time")
        }
    }
}

/// The conversation id from the path remainder (`/ID`), percent-decoded.
pub fn conversation_id(rest: &str) -> Result<String, String> {
    let raw = rest.strip_prefix('/').unwrap_or(rest);
    if raw.is_empty() {
        return Err("conversation id is empty".into());
    }
    if raw.contains('/') {
        return Err("conversation id must be a single path segment".into());
    }
    let id = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "conversation id is not valid UTF-8".to_string())?
        .into_owned();
    if id.trim().is_empty() {
        return Err("conversation id is empty".into());
    }
    if id.len() > MAX_CONVERSATION_BYTES {
        return Err(format!(
            "conversation id is longer than {MAX_CONVERSATION_BYTES} bytes"
        ));
    }
    if id.chars().any(char::is_control) {
        return Err("conversation id contains control characters".into());
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids() {
        assert_eq!(conversation_id("/abc"), Ok("abc".into()));
        assert_eq!(conversation_id("/a%20b"), Ok("a b".into()));
        assert!(conversation_id("/").is_err());
        assert!(conversation_id("").is_err());
        assert!(conversation_id("/a/b").is_err());
        assert!(conversation_id("/%FF").is_err());
        assert!(conversation_id("/%0A").is_err());
        assert!(conversation_id(&format!("/{}", "x".repeat(257))).is_err());
        assert!(conversation_id(&format!("/{}", "x".repeat(256))).is_ok());
    }
}
