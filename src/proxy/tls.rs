//! TLS termination for the HTTPS listener: the rustls `ServerConfig`, the SNI certificate
//! resolver over the published snapshot, and the self-signed fallback certificate.
//!
//! Owns: protocol versions (TLS 1.2 and 1.3 only), cipher suite preference, ALPN (`h2`,
//! `http/1.1`), no 0-RTT, stateless session tickets, and the choice of certificate per
//! handshake. Must not import kube, k8s-openapi, hyper or the listener; certificates arrive
//! already parsed in [`crate::model::TlsTable`].

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::publish::Reader;

/// Subject alternative name of the generated fallback certificate.
pub const FALLBACK_CERT_NAME: &str = "portico-default";

/// ALPN identifiers we offer, in server preference order (RFC 7301; `h2` per RFC 9113 §3.2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN identifier of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// ALPN id of HTTP/1.0 (`curl --http1.0` offers only it): served by the HTTP/1 server, as nginx
/// does; without it such a client's handshake fails with no_application_protocol.
pub const ALPN_HTTP10: &[u8] = b"http/1.0";

/// The only protocol versions served: TLS 1.3 and 1.2 (brief §4.4, "TLS 1.2 minimum").
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the fallback certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TlsError>;

/// Cipher suites in the server's order of preference, which [`server_config`] applies over
/// the client's: AES-128-GCM first (the suite every TLS 1.3 implementation must support, RFC
/// 8446 §9.1; BoringSSL and Go order it first too), then AES-256-GCM, then ChaCha20-Poly1305.
/// ring's default order puts AES-256-GCM first, whose TLS 1.3 key schedule runs on SHA-384:
/// ring computes SHA-512 in plain code on AMD CPUs but SHA-256 with the SHA extensions, and
/// AES-128 is four rounds shorter per block, so every handshake and record costs less at the
/// same security level for TLS.
pub static CIPHER_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::ring::cipher_suite as cs;
    &[
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// The one crypto provider portico uses: ring with [`CIPHER_SUITES`], passed explicitly so no
/// process-wide default has to be installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    })
}

/// Build a rustls certified key from a DER chain and private key with the ring provider.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<CertifiedKey>> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Generate the self-signed fallback certificate (SAN [`FALLBACK_CERT_NAME`]) served when
/// neither the SNI table nor `--default-certificate` has one. Generated once at start.
pub fn generate_fallback() -> Result<Arc<CertifiedKey>> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![FALLBACK_CERT_NAME.to_string()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    certified_key(vec![cert.der().clone()], &key)
}

/// Picks the certificate for each handshake from the snapshot serving at that moment, so a
/// rotated Secret reaches the next handshake without a restart.
pub struct SniResolver {
    reader: Reader,
    fallback: Arc<CertifiedKey>,
}

impl SniResolver {
    pub fn new(reader: Reader, fallback: Arc<CertifiedKey>) -> Self {
        SniResolver { reader, fallback }
    }

    /// The certificate for `sni`: exact, then one-label wildcard, then the default certificate
    /// from the snapshot (all in [`crate::model::TlsTable::resolve`]), else the fallback.
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        // One load per handshake: the whole choice is made against a single snapshot.
        match self.reader.load() {
            Some(snapshot) => match snapshot.tls.resolve(sni) {
                Some(cert) => cert.key.clone(),
                None => self.fallback.clone(),
            },
            None => self.fallback.clone(),
        }
    }
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands us the SNI already validated as a DNS name (RFC 6066 §3 forbids IP
        // literals there); the table lower-cases it.
        Some(self.pick(client_hello.server_name()))
    }
}

/// The HTTPS listener's server configuration.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // h2 first: clients offering both get HTTP/2 (RFC 7301 §3.2, server picks).
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_HTTP10.to_vec()];
    // No 0-RTT: early data is replayable (RFC 8446 §8) and a proxy cannot know which
    // requests are safe to replay.
    cfg.max_early_data_size = 0;
    // Our suite order, not the client's: OpenSSL-based clients list AES-256-GCM first.
    cfg.ignore_client_order = true;
    // Stateless session tickets (RFC 8446 §4.6.1; RFC 5077 for TLS 1.2): the session is
    // sealed into the ticket under a key that rotates every 6 hours, so every client can
    // resume. rustls' default is a 256-entry server-side cache, which a busy listener turns
    // over in a fraction of a second (two entries per handshake), so most clients would not
    // resume. TLS 1.3 resumption runs a fresh key exchange (rustls offers psk_dhe_ke only);
    // TLS 1.2 resumption reuses the session's master secret, so a ticket key, while held
    // (in memory only, at most 12 h: the current and the previous one), could decrypt the
    // TLS 1.2 sessions it sealed. Tickets are per process: one replica's do not resume on
    // another.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_is_generated_and_served_without_snapshot() {
        let fallback = generate_fallback().expect("fallback");
        let (_p, reader) = crate::publish::channel();
        let r = SniResolver::new(reader, fallback.clone());
        assert!(Arc::ptr_eq(&r.pick(Some("example.com")), &fallback));
        assert!(Arc::ptr_eq(&r.pick(None), &fallback));
    }

    #[test]
    fn config_offers_h2_then_http11_and_no_early_data() {
        let fallback = generate_fallback().expect("fallback");
        let (_p, reader) = crate::publish::channel();
        let cfg = server_config(Arc::new(SniResolver::new(reader, fallback))).expect("config");
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()]
        );
        assert_eq!(cfg.max_early_data_size, 0);
        assert!(cfg.ignore_client_order);
    }

    #[test]
    fn provider_offers_every_ring_suite_aes128_first() {
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut ring: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        ring.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, ring, "same suites as ring's default, reordered");
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
