//! The crate's error type, [`ConnectorError`], and [`Fault`], which says whose fault an
//! error is: the user's input (a bad URL, a malformed file, a missing column), the
//! external system (the object store, the file system or the OS failed).
//!
//! Every variant names the file or URL it is about, as the user gave it.

use thiserror::Error;

/// Whose fault an error is; callers use it to choose an exit code or an HTTP status and
/// whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The user's input is wrong: fix the file, the URL or the configuration.
    Input,
    /// An external system (object store, file system, network, the OS) failed; a retry
    /// may help.
    External,
}

/// An error from reading or writing files and objects.
#[derive(Debug, Error)]
pub enum ConnectorError {
    /// The user's input is wrong: a malformed file, an unsupported type, a bad URL.
    #[error("{location}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Input {
        /// The file or URL, as the user gave it.
        location: String,
        /// The 1-based line (or row) where the problem is, when known.
        line: Option<u64>,
        /// What is wrong, naming the offending column, field or value.
        message: String,
    },
    /// No file or object exists at the location (or no matching file under a prefix).
    #[error("{location}: not found{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    NotFound {
        /// The file or URL, as the user gave it.
        location: String,
        /// What was looked for, when more than the location itself.
        detail: String,
    },
    /// The object store failed (network, permissions, service error).
    #[error("{location}: object store error: {source}")]
    Storage {
        /// The file or URL, as the user gave it.
        location: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },
    /// The local file system failed.
    #[error("{location}: I/O error: {source}")]
    Io {
        /// The file or URL, as the user gave it.
        location: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The internal async runtime could not be started or its worker failed.
    #[error("{location}: {message}")]
    Runtime {
        /// The file or URL being accessed.
        location: String,
        /// What went wrong.
        message: String,
    },
}

impl ConnectorError {
    /// Whose fault the error is.
    pub fn fault(&self) -> Fault {
        match self {
            ConnectorError::Input { .. } | ConnectorError::NotFound { .. } => Fault::Input,
            ConnectorError::Storage { .. }
            | ConnectorError::Io { .. }
            | ConnectorError::Runtime { .. } => Fault::External,
        }
    }

    /// The file or URL the error is about.
    pub fn location(&self) -> &str {
        match self {
            ConnectorError::Input { location, .. }
            | ConnectorError::NotFound { location, .. }
            | ConnectorError::Storage { location, .. }
            | ConnectorError::Io { location, .. }
            | ConnectorError::Runtime { location, .. } => location,
        }
    }

    /// An input error without a line.
    pub(crate) fn input(location: &str, message: impl Into<String>) -> Self {
        ConnectorError::Input {
            location: location.to_string(),
            line: None,
            message: message.into(),
        }
    }

    /// An input error at a line.
    pub(crate) fn input_at(location: &str, line: u64, message: impl Into<String>) -> Self {
        ConnectorError::Input {
            location: location.to_string(),
            line: Some(line),
            message: message.into(),
        }
    }

    /// Maps an object store error: a missing object or an invalid path is the user's
    /// input, anything else is the store's failure.
    pub(crate) fn storage(location: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => ConnectorError::NotFound {
                location: location.to_string(),
                detail: String::new(),
            },
            object_store::Error::InvalidPath { source } => {
                ConnectorError::input(location, format!("invalid path: {source}"))
            }
            source => ConnectorError::Storage {
                location: location.to_string(),
                source,
            },
        }
    }

    /// Maps a local I/O error; a missing file is the user's input.
    pub(crate) fn io(location: &str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConnectorError::NotFound {
                location: location.to_string(),
                detail: String::new(),
            }
        } else {
            ConnectorError::Io {
                location: location.to_string(),
                source,
            }
        }
    }
}
