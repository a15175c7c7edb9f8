//! cairn's NBD server. [`proto`] parses and encodes the wire protocol as pure functions over
//! bytes; [`server`] runs it on tokio over any set of [`Exports`], such as the volumes and
//! snapshots of a cairn store ([`VolumeExports`]).

pub mod export;
pub mod proto;
pub mod server;

pub use export::{Export, ExportError, ExportListing, Exports, LookupError, VolumeExports};
pub use server::{serve, serve_connection, tls_acceptor, Listener, ServerConfig, TlsMode, TlsSetupError, MAX_PAYLOAD};
