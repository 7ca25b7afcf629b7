//! A TCP proxy that cuts every connection once it has passed a number of
//! response bytes: a flaky link, whose every blip a fresh connection (or a
//! request for the rest) gets past.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct CuttingProxy {
    /// `http://ADDR` of the proxy.
    pub url: String,
    cuts: Arc<AtomicU64>,
}

impl CuttingProxy {
    /// Forwards connections to `upstream`; each is closed (both ways) once
    /// `cut_after` bytes of the upstream's answers have gone through it.
    pub fn start(upstream: SocketAddr, cut_after: usize) -> CuttingProxy {
        let cuts = Arc::new(AtomicU64::new(0));
        let counted = cuts.clone();
        let url = proxy_to(upstream, move |client, server| {
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
                let _ = to_server.shutdown(Shutdown::Write);
            });
            let counted = counted.clone();
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let mut buf = vec![0u8; 64 << 10];
                let mut left = cut_after;
                while left > 0 {
                    let n = match server.read(&mut buf[..left.min(64 << 10)]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
                if left == 0 {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
            });
        });
        CuttingProxy { url, cuts }
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

/// Where [`AnswerCutter`] cuts the answer.
#[derive(Clone, Copy)]
pub enum Cut {
    /// After this many bytes of the answer's head: no status for the client.
    InHead(usize),
    /// After the whole head and this many bytes of the body (an answer
    /// without a body: before the end of its head).
    InBody(usize),
}

/// A TCP proxy that cuts one connection, once: in the answer to the first
/// request whose bytes contain a pattern (`POST /v1/ops/rename`). The
/// server has done what was asked; the client never learns how it went.
pub struct AnswerCutter {
    /// `http://ADDR` of the proxy.
    pub url: String,
    cuts: Arc<AtomicU64>,
}

impl AnswerCutter {
    pub fn start(upstream: SocketAddr, pattern: &'static str, cut: Cut) -> AnswerCutter {
        let cuts = Arc::new(AtomicU64::new(0));
        let done = cuts.clone();
        let url = proxy_to(upstream, move |client, server| {
            // Set before the matching request goes on, so that the answer
            // that follows it on this connection is the one cut.
            let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (arming, done_up) = (armed.clone(), done.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match from_client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let seen = buf[..n]
                        .windows(pattern.len())
                        .any(|w| w == pattern.as_bytes());
                    if seen && done_up.load(Ordering::SeqCst) == 0 {
                        arming.store(true, Ordering::SeqCst);
                    }
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(Shutdown::Write);
            });
            let done = done.clone();
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let mut buf = vec![0u8; 64 << 10];
                let mut answer = Vec::new();
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if !armed.load(Ordering::SeqCst) {
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        continue;
                    }
                    answer.extend_from_slice(&buf[..n]);
                    let head = answer.windows(4).position(|w| w == b"\r\n\r\n");
                    let keep = match (cut, head) {
                        (Cut::InHead(k), _) => k.min(answer.len()),
                        // An answer without a body is cut before its head ends.
                        (Cut::InBody(_), Some(end)) if answer.starts_with(b"HTTP/1.1 204") => end,
                        (Cut::InBody(k), Some(end)) if answer.len() >= end + 4 + k => end + 4 + k,
                        // Not all of the head and the bytes to keep yet.
                        _ => continue,
                    };
                    let _ = client.write_all(&answer[..keep]);
                    done.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
            });
        });
        AnswerCutter { url, cuts }
    }

    /// Whether the cut was made.
    pub fn cut(&self) -> bool {
        self.cuts.load(Ordering::SeqCst) > 0
    }
}

/// Listens on a port of its own and hands every connection, with a fresh
/// one to `upstream`, to `each`. Returns `http://ADDR`.
fn proxy_to(upstream: SocketAddr, each: impl Fn(TcpStream, TcpStream) + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            each(client, server);
        }
    });
    url
}
