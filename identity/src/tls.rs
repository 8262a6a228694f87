//! rustls configurations that present the current X509-SVID and verify peers as SPIFFE workloads.
//!
//! Both configs read the credentials from a watch channel at each handshake, so a rotated SVID or
//! bundle is used by the next handshake while established connections are left alone.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::verifier::{SpiffeClientVerifier, SpiffeServerVerifier};
use crate::{CredentialsRx, SpiffeId};

/// TLS 1.3 preferred, 1.2 allowed; rustls has nothing older.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The current SVID, as the certificate resolver for both ends.
#[derive(Debug)]
struct CurrentSvid(CredentialsRx);

impl CurrentSvid {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let creds = self.0.borrow();
        let creds = creds.as_ref()?;
        Some(creds.svid.certified_key().clone())
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config requiring a client X509-SVID, offering `alpn` in order of preference.
pub fn server_config(creds: CredentialsRx, alpn: &[&[u8]]) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(creds.clone())))
        .with_cert_resolver(Arc::new(CurrentSvid(creds)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.ignore_client_order = true;
    no_resumption_server(&mut config);
    Ok(config)
}

/// A client config presenting our SVID and accepting only servers whose ID is in `expected`.
pub fn client_config(
    creds: CredentialsRx,
    expected: Arc<[SpiffeId]>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            creds.clone(),
            expected,
        )))
        .with_client_cert_resolver(Arc::new(CurrentSvid(creds)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed session skips certificate verification and keeps the first session's
    // certificates, so an expired or rotated-out SVID would keep authenticating. Every
    // connection verifies both SVIDs in full; connections are pooled, so this costs little.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn no_resumption_server(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// The SPIFFE ID in the leaf a verified peer presented, if any.
pub fn peer_spiffe_id(
    peer_certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
) -> Option<SpiffeId> {
    let leaf = peer_certs?.first()?;
    crate::svid::check_leaf(leaf).ok().map(|l| l.spiffe_id)
}
