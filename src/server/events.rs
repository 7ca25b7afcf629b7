//! `GET /v1/events?prefix=`: the change feed as Server-Sent Events.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use super::auth::Caller;
use super::extract::ApiQuery;
use crate::error::Result;
use crate::protocol::RemotePath;

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    prefix: RemotePath,
}

/// Each change is an event named `change` with the change as JSON data. A
/// subscriber that fell behind gets an `error` event (`{"code":"lagged",…}`)
/// and continues with the newest changes.
pub async fn events(
    State(app): State<AppState>,
    Caller(grant): Caller,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let prefix = grant.watch_prefix(&query.prefix)?;
    let receiver = app.store().subscribe();
    let stream = futures::stream::unfold(receiver, move |mut receiver| {
        let prefix = prefix.clone();
        async move {
            loop {
                let event = match receiver.recv().await {
                    Ok(change) => match change.seen_from(&prefix) {
                        Some(change) => Event::default()
                            .event("change")
                            .json_data(&change)
                            .expect("changes serialize"),
                        None => continue,
                    },
                    Err(RecvError::Lagged(missed)) => Event::default().event("error").data(
                        serde_json::json!({
                            "code": "lagged",
                            "message": format!("{missed} changes were missed; re-read what you cache"),
                        })
                        .to_string(),
                    ),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok(event), receiver));
            }
        }
    });
    // Ends when the server shuts down, which otherwise waits for it.
    let stream = stream.take_until(app.shutdown_token().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
