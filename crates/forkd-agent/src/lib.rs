//! forkd-agent: the guest agent protocol and server.
