//! Bitbucket credentials for the rolling-upgrade API: a Bearer token or Basic user and password, read from a
//! file (mode checked) or the environment, never printed.

use std::fmt;
use std::path::Path;

/// A token or password that never shows up in logs: `Debug` and `Display` print `***`.
#[derive(Clone)]
pub struct Secret {
    value: String,
    origin: String,
}

/// Why a token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "cannot read the Bitbucket token file {path}: {source}; check the path and its permissions"
    )]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the Bitbucket credentials file {path} is empty; write a system administrator's token or password into it"
    )]
    EmptyFile { path: String },
    #[error(
        "the Bitbucket credentials file {path} has mode {mode:o}: others than its owner can read it; run `chmod 600 {path}`"
    )]
    TooOpen { path: String, mode: u32 },
    #[error(
        "environment variable {var} is not set, empty or not UTF-8; set it to a Bitbucket system administrator's token or password"
    )]
    MissingEnv { var: String },
}

/// How the coordinator authenticates to Bitbucket. Basic over TLS is Atlassian's documented preferred
/// method; a Bearer personal access token may lack system-admin rights.
#[derive(Clone, Debug)]
pub enum Credentials {
    Bearer(Secret),
    Basic { user: String, password: Secret },
}

impl Credentials {
    /// The `Authorization` header value.
    pub fn header(&self) -> String {
        use base64::Engine;
        match self {
            Credentials::Bearer(t) => format!("Bearer {}", t.expose()),
            Credentials::Basic { user, password } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{user}:{}", password.expose()))
            ),
        }
    }

    /// For messages: "the token in file F" or "user U (password in file F)"; never the secret.
    pub fn describe(&self) -> String {
        match self {
            Credentials::Bearer(t) => format!("the token in {}", t.origin()),
            Credentials::Basic { user, password } => {
                format!("user '{user}' (password in {})", password.origin())
            }
        }
    }

    pub fn is_bearer(&self) -> bool {
        matches!(self, Credentials::Bearer(_))
    }
}

impl Secret {
    /// A token from elsewhere; `origin` says where it came from, for error messages (never the value).
    pub fn new(value: impl Into<String>, origin: impl Into<String>) -> Self {
        Self {
            value: value.into(),
            origin: origin.into(),
        }
    }

    /// Reads a token file (blocking; meant for start-up), trimming surrounding whitespace and newlines.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        use std::os::unix::fs::MetadataExt;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SecretError::Unreadable {
            path: shown.clone(),
            source,
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(SecretError::TooOpen {
                path: shown,
                mode: meta.mode() & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Unreadable {
            path: shown.clone(),
            source,
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(SecretError::EmptyFile { path: shown });
        }
        Ok(Self::new(value, format!("file {shown}")))
    }

    /// Reads a token from an environment variable, trimming surrounding whitespace.
    pub fn from_env(var: &str) -> Result<Self, SecretError> {
        let missing = || SecretError::MissingEnv {
            var: var.to_string(),
        };
        let text = std::env::var(var).map_err(|_| missing())?;
        let value = text.trim();
        if value.is_empty() {
            return Err(missing());
        }
        Ok(Self::new(value, format!("environment variable {var}")))
    }

    /// The token itself; only for building the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Where the token came from, e.g. `file /etc/bbupgrade/token`.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
