//! One module per subcommand.

pub mod bench;
pub mod crd;
pub mod decide;
pub mod eval;
pub mod install;
pub mod operator;
pub mod policies;
pub mod quickstart;
pub mod replay_llm;
pub mod setup;
pub mod sidecar;
pub mod standalone;
pub mod train;
