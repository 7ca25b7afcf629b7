//! `GET` and `HEAD` of `/v1/files/…` answered without the router.
//!
//! On 64 KiB ranges the router, its layers and the extractors were about
//! 15 % of ferry's CPU per request (bench/RESULTS.md, serve notes). When none
//! of the layers that exist only by configuration (rate limit, transfer
//! limit, CORS) is installed, the plain-HTTP connection driver hands file
//! reads here instead: the same authentication ([`auth::admit`]), handler
//! ([`files::read_file`]) and metrics ([`Metrics::answered`]) as the
//! router's path, called in line. These requests carry no body, so the body
//! timeout has nothing to time.
//!
//! [`Metrics::answered`]: super::metrics::Metrics::answered

use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::auth;
use super::extract::{path_after_route, query_of};
use super::files;
use crate::error::Result;

/// The router's path for file reads, taken in line.
#[derive(Clone)]
pub struct DirectReads(AppState);

impl DirectReads {
    /// `None` when the server has a layer this path would skip.
    pub fn new(state: &AppState) -> Option<Self> {
        (!super::has_optional_layers(state)).then(|| Self(state.clone()))
    }

    /// Answers a bodiless `GET` or `HEAD` of a path under `/v1/files/`.
    pub async fn respond(&self, request: Request<Body>) -> Response {
        let started = Instant::now();
        let (parts, _) = request.into_parts();
        // The router's names for the two routes these paths can match.
        let route = if parts.uri.path() == "/v1/files/" {
            "/v1/files/"
        } else {
            "/v1/files/{*path}"
        };
        let response = self
            .read(&parts)
            .await
            .unwrap_or_else(IntoResponse::into_response);
        self.0
            .metrics()
            .answered(route.to_owned(), &parts.method, started, response)
    }

    async fn read(&self, parts: &Parts) -> Result<Response> {
        let grant = auth::admit(&self.0, parts)?;
        let path = path_after_route(&parts.uri)?;
        let query = query_of(&parts.uri)?;
        files::read_file(
            &self.0,
            &grant,
            &parts.method,
            &parts.headers,
            &path,
            &query,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::{HeaderMap, Method, StatusCode, header};
    use tower::ServiceExt;

    use super::*;
    use crate::protocol::RemotePath;
    use crate::server::auth::{Authenticator, Scope, new_token, unix_now};
    use crate::server::{ServerConfig, Store, router};

    const SIGNING_KEY: &str = "a signing secret of some length";

    /// Two servers over one store: one answers through the router, the
    /// other through [`DirectReads`].
    struct Pair {
        routed: AppState,
        direct: AppState,
        _dir: tempfile::TempDir,
    }

    impl Pair {
        fn new(auth: Authenticator) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(dir.path().join("a.mp4"), &data).unwrap();
            std::fs::create_dir(dir.path().join("sub")).unwrap();
            std::fs::write(dir.path().join("sub/b.txt"), b"bee").unwrap();
            let auth = Arc::new(auth);
            let state = || {
                let store = Store::open(dir.path().to_str().unwrap()).unwrap();
                let config = ServerConfig {
                    auth: auth.clone(),
                    ..ServerConfig::default()
                };
                AppState::new(store, config)
            };
            Self {
                routed: state(),
                direct: state(),
                _dir: dir,
            }
        }

        /// Status, headers and body of one request, asked both ways.
        async fn both(&self, method: Method, uri: &str, headers: &[(&str, &str)]) -> Answer {
            let request = || {
                let mut request = Request::builder().method(method.clone()).uri(uri);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.body(Body::empty()).unwrap()
            };
            let routed = router(self.routed.clone())
                .oneshot(request())
                .await
                .unwrap();
            let direct = DirectReads::new(&self.direct)
                .expect("no layers configured")
                .respond(request())
                .await;
            let routed = Answer::of(routed).await;
            let direct = Answer::of(direct).await;
            assert_eq!(routed, direct, "{method} {uri} {headers:?}");
            routed
        }

        /// The request counters and sent bytes of both servers, which have
        /// counted requests to each of `routes`.
        async fn assert_same_counts(&self, bearer: Option<&str>, routes: &[&str]) {
            let counts = |state: &AppState| {
                let mut request = Request::get("/metrics");
                if let Some(token) = bearer {
                    request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
                }
                let request = request.body(Body::empty()).unwrap();
                let app = router(state.clone());
                async move {
                    let text = Answer::of(app.oneshot(request).await.unwrap()).await.body;
                    String::from_utf8(text)
                        .unwrap()
                        .lines()
                        .filter(|l| {
                            l.starts_with("ferry_http_requests_total")
                                || l.starts_with("ferry_http_request_duration_seconds_count")
                                || l.starts_with("ferry_sent_bytes_total")
                        })
                        .map(str::to_owned)
                        .collect::<std::collections::BTreeSet<_>>()
                }
            };
            let routed = counts(&self.routed).await;
            for route in routes {
                let label = format!("route=\"{route}\"");
                assert!(routed.iter().any(|l| l.contains(&label)), "{routed:?}");
            }
            assert_eq!(routed, counts(&self.direct).await);
        }
    }

    #[derive(Debug, PartialEq)]
    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Answer {
        async fn of(response: Response) -> Self {
            let (mut parts, body) = response.into_parts();
            // axum's router declares a sized body's length; the connection
            // driver does the same for a response made without it.
            if let Some(exact) = http_body::Body::size_hint(&body).exact() {
                parts
                    .headers
                    .entry(header::CONTENT_LENGTH)
                    .or_insert(exact.into());
            }
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            Self {
                status: parts.status,
                headers: parts.headers,
                body: body.to_vec(),
            }
        }
    }

    #[tokio::test]
    async fn file_reads_are_answered_as_the_router_answers_them() {
        let pair = Pair::new(Authenticator::default());
        let full = pair.both(Method::GET, "/v1/files/a.mp4", &[]).await;
        assert_eq!(full.status, StatusCode::OK);
        assert_eq!(full.body.len(), 10_000);
        let etag = full.headers[header::ETAG].to_str().unwrap().to_owned();
        let ranges = [
            ("bytes=0-499", StatusCode::PARTIAL_CONTENT, 500),
            ("bytes=-500", StatusCode::PARTIAL_CONTENT, 500),
            ("bytes=10000-", StatusCode::RANGE_NOT_SATISFIABLE, 0),
            ("bytes=0-1,5-6", StatusCode::OK, 10_000),
            ("bytes=x", StatusCode::OK, 10_000),
        ];
        for (range, status, len) in ranges {
            let answer = pair
                .both(Method::GET, "/v1/files/a.mp4", &[("range", range)])
                .await;
            assert_eq!(answer.status, status, "{range}");
            if status != StatusCode::RANGE_NOT_SATISFIABLE {
                assert_eq!(answer.body.len(), len, "{range}");
            }
        }
        let head = pair
            .both(
                Method::HEAD,
                "/v1/files/a.mp4",
                &[("range", "bytes=9990-20000")],
            )
            .await;
        assert_eq!(head.headers[header::CONTENT_LENGTH], "10");
        assert!(head.body.is_empty());
        let conditional = [
            ("if-none-match", etag.as_str(), StatusCode::NOT_MODIFIED),
            ("if-match", "\"stale\"", StatusCode::PRECONDITION_FAILED),
        ];
        for (name, value, status) in conditional {
            let answer = pair
                .both(Method::GET, "/v1/files/a.mp4", &[(name, value)])
                .await;
            assert_eq!(answer.status, status);
        }
        let stale_if_range = [("range", "bytes=0-9"), ("if-range", "\"stale\"")];
        let answer = pair
            .both(Method::GET, "/v1/files/a.mp4", &stale_if_range)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let attached = pair
            .both(Method::GET, "/v1/files/sub/b.txt?download=1", &[])
            .await;
        assert!(attached.headers.contains_key(header::CONTENT_DISPOSITION));
        let refused = [
            ("/v1/files/", StatusCode::CONFLICT),
            ("/v1/files/sub", StatusCode::CONFLICT),
            ("/v1/files/missing", StatusCode::NOT_FOUND),
            ("/v1/files/%2e%2e/x", StatusCode::BAD_REQUEST),
            ("/v1/files/a//b", StatusCode::BAD_REQUEST),
            (
                "/v1/files/a.mp4?download=1&download=2",
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (uri, status) in refused {
            let answer = pair.both(Method::GET, uri, &[]).await;
            assert_eq!(answer.status, status, "{uri}: {answer:?}");
        }
        pair.assert_same_counts(None, &["/v1/files/{*path}", "/v1/files/"])
            .await;
    }

    #[tokio::test]
    async fn tokens_and_signed_urls_are_checked_as_the_router_checks_them() {
        let (reader, reader_config) = new_token("reader", vec![Scope::Read], "sub/");
        let auth = Authenticator::new(&[reader_config], Some(SIGNING_KEY)).unwrap();
        let expires = unix_now() + 600;
        let signature = auth.signature(&RemotePath::parse("a.mp4").unwrap(), expires);
        let pair = Pair::new(auth);
        let bearer = format!("Bearer {reader}");
        let with_token = [("authorization", bearer.as_str())];
        let cases = [
            (
                "/v1/files/sub/b.txt".to_owned(),
                &with_token[..],
                StatusCode::OK,
            ),
            (
                "/v1/files/a.mp4".to_owned(),
                &with_token[..],
                StatusCode::FORBIDDEN,
            ),
            (
                "/v1/files/sub/b.txt".to_owned(),
                &[][..],
                StatusCode::UNAUTHORIZED,
            ),
            (
                "/v1/files/sub/b.txt".to_owned(),
                &[("authorization", "Basic eA==")][..],
                StatusCode::UNAUTHORIZED,
            ),
            (
                format!("/v1/files/a.mp4?expires={expires}&signature={signature}"),
                &[][..],
                StatusCode::OK,
            ),
            (
                format!("/v1/files/sub/b.txt?expires={expires}&signature={signature}"),
                &[][..],
                StatusCode::FORBIDDEN,
            ),
        ];
        for (uri, headers, status) in cases {
            let answer = pair.both(Method::GET, &uri, headers).await;
            assert_eq!(answer.status, status, "{uri} {headers:?}");
        }
        pair.assert_same_counts(Some(&reader), &["/v1/files/{*path}"])
            .await;
    }

    #[test]
    fn servers_with_optional_layers_keep_the_router() {
        let dir = tempfile::tempdir().unwrap();
        let state = |config: ServerConfig| {
            AppState::new(Store::open(dir.path().to_str().unwrap()).unwrap(), config)
        };
        assert!(DirectReads::new(&state(ServerConfig::default())).is_some());
        let with_cors = ServerConfig {
            cors_origins: vec!["*".into()],
            ..ServerConfig::default()
        };
        assert!(DirectReads::new(&state(with_cors)).is_none());
        let with_transfer_limit = ServerConfig {
            max_transfers_per_token: Some(2),
            ..ServerConfig::default()
        };
        assert!(DirectReads::new(&state(with_transfer_limit)).is_none());
        let with_rate_limit = ServerConfig {
            rate_limit: Some(crate::server::limits::RateLimit {
                per_second: 10,
                burst: 10,
            }),
            ..ServerConfig::default()
        };
        assert!(DirectReads::new(&state(with_rate_limit)).is_none());
    }
}
