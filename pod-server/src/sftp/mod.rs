
pub mod paths;
pub mod ops;
pub mod client;
pub mod handles;
pub mod order;
pub mod server;
