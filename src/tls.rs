//! TLS for the server (`--tls-cert`/`--tls-key`) and the clients (`https://`
//! servers, with the system's roots plus an optional CA file). One crypto
//! provider (ring) for both.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default provider, for code that builds TLS
/// settings on its own (the HTTP client does, even for `http://` servers).
/// Needed once several providers are compiled in (the `cloud` feature brings
/// another), when rustls cannot pick one by itself.
pub fn install_default_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Someone else installing one first is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn tls_error(what: String) -> impl FnOnce(rustls::Error) -> Error {
    move |e| Error::BadRequest(format!("{what}: {e}"))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::BadRequest(format!("reading certificates from {}: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(Error::BadRequest(format!(
            "no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The acceptor for a server with this certificate chain and private key
/// (PEM files). Offers HTTP/2 and HTTP/1.1.
pub fn server_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        Error::BadRequest(format!("reading the private key {}: {e}", key.display()))
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error("TLS versions".into()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls_error(format!("the certificate {}", cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The client side: the system's trusted roots, plus `ca_file` when given
/// (a private CA or a self-signed server certificate).
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca_file {
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .map_err(tls_error(format!("the CA file {}", ca.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(Error::BadRequest(
            "no trusted root certificates: install ca-certificates or pass a CA file".into(),
        ));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error("TLS versions".into()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
