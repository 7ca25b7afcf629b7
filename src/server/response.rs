//! Turning errors into the JSON error body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::Error;
use crate::protocol::range::unsatisfied_content_range;
use crate::protocol::{ErrorBody, ErrorCode};

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        log_failure(&self, "request failed");
        let mut body = ErrorBody::new(self.code(), self.to_string());
        if let Error::MissingChunks(runs) = &self {
            body.error.missing = Some(runs.clone());
        }
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Error::PayloadTooLarge { .. }) {
            // The rest of the body is not read: this connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // A per-token limit frees when one of the token's own transfers or
        // sessions ends, which no clock predicts: a second is the hint.
        let retry_after = match self {
            Error::RateLimited { retry_after } => Some(retry_after),
            Error::LimitReached(_) => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Error::Unauthorized(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry\""),
            );
        }
        if let Error::RangeNotSatisfiable { size } = self
            && let Ok(value) = HeaderValue::from_str(&unsatisfied_content_range(size))
        {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        response
    }
}

/// Logs a failure that is the server's, not the request's, with what its
/// message to the client leaves out.
pub(super) fn log_failure(e: &Error, what: &str) {
    if (500..600).contains(&e.status()) {
        match e.log_detail() {
            Some(detail) => tracing::error!(error = %e, detail, "{what}"),
            None => tracing::error!(error = %e, "{what}"),
        }
    }
}

pub fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody::new(
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        )),
    )
        .into_response()
}
