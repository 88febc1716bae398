//! The Kubernetes target: a Deployment's container swapped, in place, for a dev container that
//! runs devmount-server, and swapped back exactly.
//!
//! - [`translate`] is the swap as a pure function: the original Deployment, the manifest's
//!   [`DevSettings`](crate::manifest::DevSettings) and the session's inputs in; the dev
//!   Deployment, the session's Secret and the persistent volume's claim out. [`translate::restore`]
//!   is its inverse. No I/O, no clock, no randomness: the same inputs give the same bytes.
//! - [`render`] is `devmount render`: the swap of a Deployment read from a file, printed as YAML.
//!
//! docs/kubernetes.md tells what the swap changes in the cluster and why.

pub mod render;
pub mod translate;
