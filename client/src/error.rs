//! What can go wrong talking to a Switchboard server, grouped by who is at fault.

use std::fmt;

use switchboard_wire::{DecodeError, ErrorFrame};

/// Errors of [`crate::Client`].
///
/// Who is at fault: `Io`, `Timeout` — the network or a slow server; `Rejected`, `Closed`,
/// `Server` — the server said no (usually about something this client did); `WebSocket`,
/// `Decode`, `Protocol` — one side broke the protocol.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be made, or a socket call failed.
    Io(std::io::Error),
    /// The server answered the upgrade request with this HTTP status instead of 101 (401: missing
    /// or bad token). `body` holds whatever part of the response body arrived with the headers,
    /// lossily decoded as UTF-8.
    Rejected { status: u16, body: String },
    /// A WebSocket-level failure (bad framing, a message over the size limit, the TCP connection
    /// dropped without a close handshake, ...).
    WebSocket(tungstenite::Error),
    /// The server closed the WebSocket with this code (1000 normal, 1002 protocol error, 1003 text
    /// frame, 1008 auth expired, 1009 frame too big, 1011 internal, 1013 overloaded or slow
    /// consumer, 4000+ application codes; 1005 when the Close frame carried no code). Every later
    /// call on the same client returns this again.
    Closed { code: u16, reason: String },
    /// A binary message from the server is not a valid envelope. (A valid envelope with a frame
    /// type this version does not know is skipped instead, as the schema's evolution rules say.)
    Decode(DecodeError),
    /// The server answered a request of this client with an `Error` frame.
    Server(ErrorFrame),
    /// Nothing arrived in time; the string says what was being waited for.
    Timeout(&'static str),
    /// The server (or a caller) broke an expectation of this library, e.g. a text message from
    /// the server or the internal frame stash overflowing.
    Protocol(String),
}

impl ClientError {
    /// The close code if the server closed the connection.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this is a [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout(_))
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Rejected { status, body } => {
                write!(f, "upgrade rejected with HTTP {status}")?;
                if !body.is_empty() {
                    write!(f, ": {body}")?;
                }
                Ok(())
            }
            ClientError::WebSocket(e) => write!(f, "websocket error: {e}"),
            ClientError::Closed { code, reason } => {
                write!(f, "connection closed by server with code {code}")?;
                if !reason.is_empty() {
                    write!(f, ": {reason}")?;
                }
                Ok(())
            }
            ClientError::Decode(e) => write!(f, "undecodable server frame: {e}"),
            ClientError::Server(e) => {
                write!(f, "server error {:?}: {}", e.code, e.text)?;
                if let Some(id) = e.client_msg_id {
                    write!(f, " (client_msg_id {id})")?;
                }
                if e.request_id != 0 {
                    write!(f, " (request_id {})", e.request_id)?;
                }
                Ok(())
            }
            ClientError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            ClientError::Protocol(s) => write!(f, "protocol violation: {s}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) => Some(e),
            ClientError::WebSocket(e) => Some(e),
            ClientError::Decode(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Decode(e)
    }
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(e) => ClientError::Io(e),
            tungstenite::Error::Http(response) => ClientError::Rejected {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            },
            other => ClientError::WebSocket(other),
        }
    }
}
