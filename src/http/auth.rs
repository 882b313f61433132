//! Optional bearer-token auth for `/v1/*` (`--auth-token-file`), compared in constant time.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The accepted tokens (one per non-empty, non-`#` line of the file).
#[derive(Clone, Default)]
pub struct Tokens(Vec<Vec<u8>>);

/// Never prints the tokens themselves.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --auth-token-file {}: {e}", path.display()))?;
        let tokens: Vec<Vec<u8>> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(|l| l.as_bytes().to_vec()).collect();
        if tokens.is_empty() {
            return Err(format!("--auth-token-file {} holds no token (one per line)", path.display()));
        }
        Ok(Tokens(tokens))
    }

    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Every token is compared (no early exit), each in constant time.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(0u8, |ok, t| ok | t.as_slice().ct_eq(presented).unwrap_u8()) == 1
    }
}

/// Rejects `/v1/*` requests without a valid `Authorization: Bearer <token>` when auth is on.
pub async fn require_bearer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !st.auth.is_enabled() {
        return next.run(req).await;
    }
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match presented {
        Some(t) if st.auth.accepts(t.as_bytes()) => next.run(req).await,
        _ => {
            let mut r = ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unauthorized", "send `Authorization: Bearer <token>` with a token from --auth-token-file").into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_and_matching() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "# comment\n\n  alpha  \nbeta\n").unwrap();
        let t = Tokens::load(&f).unwrap();
        assert!(t.accepts(b"alpha") && t.accepts(b"beta"));
        assert!(!t.accepts(b"alph") && !t.accepts(b"") && !t.accepts(b"alphaa"));
        std::fs::write(&f, "# only a comment\n").unwrap();
        assert!(Tokens::load(&f).unwrap_err().contains("holds no token"));
        assert!(Tokens::load(&dir.path().join("missing")).unwrap_err().contains("cannot read"));
    }
}
