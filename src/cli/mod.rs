//! Subcommands of the `llava-jp` binary that are more than a few lines.
pub mod chat;
pub mod data;
pub mod demo;
pub mod serve;
pub mod train;
