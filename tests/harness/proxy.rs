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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cuts = Arc::new(AtomicU64::new(0));
        let counted = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
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
            }
        });
        CuttingProxy { url, cuts }
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}
