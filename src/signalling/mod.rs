//! The `/connect` signalling protocol, with no sockets: the message formats
//! ([`message`]), the close codes ([`close`]) and the session state machine
//! ([`session`]) that `crate::http::connect` drives with bytes and time.

pub(crate) mod close;
pub(crate) mod message;
pub(crate) mod session;

pub(crate) use close::CloseCode;
pub(crate) use session::{Action, ReadFault, Session};
