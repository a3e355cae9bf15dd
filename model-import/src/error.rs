use std::path::PathBuf;

/// Everything that can go wrong while importing a checkpoint. Every variant names the file and
/// key at fault so that a user can look at the right tensor.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: no checkpoint found (looked for {looked_for})")]
    NoCheckpoint { path: PathBuf, looked_for: String },
    #[error("{path}: cannot read checkpoint: {message}")]
    Read { path: PathBuf, message: String },
    #[error("key `{key}` is stored in both {first} and {second}")]
    DuplicateKey { key: String, first: PathBuf, second: PathBuf },
    #[error("checkpoint does not load cleanly ({} problem(s)):\n  {}", .problems.len(), .problems.join("\n  "))]
    Mismatch { problems: Vec<String> },
    #[error("tensor `{key}` in {file}: {message}")]
    Tensor { key: String, file: PathBuf, message: String },
}
