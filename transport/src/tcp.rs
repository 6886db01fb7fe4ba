//! The fallback transport: TLS over TCP with yamux, for networks that
//! block UDP. It carries exactly what QUIC carries: bidirectional streams
//! (yamux streams) and datagrams (length-prefixed on a dedicated stream,
//! the first one the edge opens, marked with [`DATAGRAM_STREAM_MARK`]).
//!
//! By concern: `mux` runs yamux over an established TLS stream
//! ([`YamuxConn`]); `dial` dials and accepts the TLS+TCP connection
//! ([`connect_detailed`], [`accept`]); `socket` holds the TCP socket
//! options ([`tune_socket`], the fallback's MSS).

mod budget;
mod counted;
mod dial;
mod driver;
mod mux;
mod socket;

pub use dial::{
    accept, closed_early, connect, connect_detailed, connect_with, AcceptError, ConnectError,
    TcpDial,
};
#[doc(hidden)]
pub use driver::set_datagram_stream_grace;
pub use mux::{
    TcpRecv, TcpSend, TcpStreamHalf, YamuxConn, DATAGRAM_STREAM_MARK, MAX_TCP_DATAGRAM,
    SESSION_RECEIVE_LIMIT,
};
pub use socket::{
    fallback_mss_setting, set_listener_mss, set_not_sent_lowat, tune_listener, tune_socket,
    DEFAULT_FALLBACK_MSS, FALLBACK_MSS_RANGE, USER_TIMEOUT,
};
