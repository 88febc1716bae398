//! Wire formats shared by the server and the client: the SFTP codec and the feed protocol.
//!
//! Nothing here knows about russh or tokio: these are plain types with `encode`/`decode`, so
//! the client and the tests link exactly the code the server speaks.

pub mod feed;
pub mod sftp;
pub mod stat;
pub mod wire;

/// The server's version, reported in the SFTP version packet and the feed's hello.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
