//! TLS: Ingress `spec.tls[]` entries and `--default-certificate` → the SNI [`TlsTable`]
//! (brief §4.3, §4.4; Kubernetes `IngressTLS`, Secret type `kubernetes.io/tls`).
//!
//! Owns: Secret → [`CertKey`] parsing (PEM via rustls-pki-types, keys via the ring provider) and
//! host → certificate assignment. Must not import tokio, hyper or the filesystem.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::model::{CertKey, TlsTable, Validity};

use super::annotations;
use super::hosts::{self, HostKey};
use super::index::{self, Index};
use super::{Diagnostic, Diags, ObjRef, Options, Severity};

/// Secret type for TLS material (Kubernetes API docs, "TLS Secrets").
pub const SECRET_TYPE_TLS: &str = "kubernetes.io/tls";
pub(super) const TLS_CRT: &str = "tls.crt";
pub(super) const TLS_KEY: &str = "tls.key";

/// Why a TLS Secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum TlsError {
    #[error("Secret {0} not found")]
    SecretNotFound(String),
    #[error("Secret {secret} has type {actual:?}, expected {SECRET_TYPE_TLS}")]
    WrongType { secret: String, actual: String },
    #[error("Secret {secret} has no {key}")]
    MissingKey { secret: String, key: &'static str },
    #[error("Secret {0}: tls.crt is not a PEM certificate chain")]
    BadCertificate(String),
    #[error("Secret {0}: tls.key is not a PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    BadKey(String),
    #[error("Secret {0}: tls.key is of an unsupported key type")]
    UnsupportedKey(String),
    #[error("Secret {0}: tls.key does not match the leaf certificate of tls.crt")]
    KeyMismatch(String),
    #[error("Secret {secret}: invalid certificate: {detail}")]
    InvalidCertificate { secret: String, detail: String },
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::SecretNotFound(_) => "SecretNotFound",
            TlsError::WrongType { .. } => "SecretWrongType",
            TlsError::MissingKey { .. } => "SecretMissingKey",
            TlsError::BadCertificate(_) | TlsError::InvalidCertificate { .. } => {
                "InvalidCertificate"
            }
            TlsError::BadKey(_) | TlsError::UnsupportedKey(_) => "InvalidPrivateKey",
            TlsError::KeyMismatch(_) => "CertificateKeyMismatch",
        }
    }
}

/// Parse a `kubernetes.io/tls` Secret into a certificate ready for handshakes, checking the key
/// belongs to the leaf certificate.
pub(super) fn load_secret(secret: &Secret) -> Result<CertKey, TlsError> {
    let source = format!(
        "{}/{}",
        index::namespace(&secret.metadata),
        index::name(&secret.metadata)
    );
    let actual = secret.type_.as_deref().unwrap_or_default();
    if actual != SECRET_TYPE_TLS {
        return Err(TlsError::WrongType {
            secret: source,
            actual: actual.to_string(),
        });
    }
    let get = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| TlsError::MissingKey {
                secret: source.clone(),
                key,
            })
    };
    let crt = get(TLS_CRT)?;
    let key = get(TLS_KEY)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::BadCertificate(source.clone()))?;
    if chain.is_empty() {
        return Err(TlsError::BadCertificate(source));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::BadKey(source.clone()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|_| TlsError::UnsupportedKey(source.clone()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch(source));
        }
        Err(e) => {
            return Err(TlsError::InvalidCertificate {
                secret: source,
                detail: e.to_string(),
            });
        }
    }
    let mut material = Vec::with_capacity(crt.len() + key.len());
    material.extend_from_slice(crt);
    material.extend_from_slice(key);
    let validity = certified.cert.first().and_then(|leaf| validity(leaf));
    Ok(CertKey {
        key: Arc::new(certified),
        source: Arc::from(source),
        material: Arc::from(material),
        validity,
    })
}

/// The leaf's `notBefore`/`notAfter` (RFC 5280 §4.1.2.5), read with x509-parser: rustls and
/// webpki check peers' dates but do not expose a certificate's own.
fn validity(leaf: &CertificateDer<'_>) -> Option<Validity> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let v = cert.validity();
    Some(Validity {
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// Warnings for the certificates (`TlsTable::certificates`) that clients refuse at `now` (Unix seconds): past
/// their `notAfter` (`CertificateExpired`) or before their `notBefore`
/// (`CertificateNotYetValid`), about the Secret they came from (its uid from `secrets`, so
/// its Events show on `kubectl describe secret`). They are served all the same: a renewed
/// Secret replaces them. Pure: the caller brings the clock (the rebuild loop checks again at
/// [`next_validity_change`]).
pub fn certificate_diagnostics(
    certificates: &[(&CertKey, Vec<String>)],
    secrets: &[Arc<Secret>],
    now: i64,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (cert, names) in certificates {
        let Some(v) = cert.validity else {
            continue;
        };
        let (reason, what, at) = if now >= v.not_after {
            ("CertificateExpired", "expired", v.not_after)
        } else if now < v.not_before {
            (
                "CertificateNotYetValid",
                "is not valid before",
                v.not_before,
            )
        } else {
            continue;
        };
        let (namespace, name) = cert.source.split_once('/').unwrap_or(("", &cert.source));
        let uid = secrets
            .iter()
            .find(|s| {
                index::namespace(&s.metadata) == namespace && index::name(&s.metadata) == name
            })
            .and_then(|s| s.metadata.uid.clone())
            .unwrap_or_default();
        let at = k8s_openapi::jiff::Timestamp::from_second(at)
            .map_or_else(|_| at.to_string(), |t| t.to_string());
        out.push(Diagnostic {
            severity: Severity::Warning,
            kind: "Secret".to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            reason: reason.to_string(),
            message: format!(
                "tls.crt {what} {at}: clients refuse it for {} (renew the Secret)",
                names.join(", ")
            ),
        });
    }
    out
}

/// The next instant (Unix seconds, after `now`) at which one of the certificates becomes valid
/// or expires: when [`certificate_diagnostics`] would say something new.
pub fn next_validity_change(certificates: &[(&CertKey, Vec<String>)], now: i64) -> Option<i64> {
    certificates
        .iter()
        .filter_map(|(cert, _)| cert.validity)
        .flat_map(|v| [v.not_before, v.not_after])
        .filter(|t| *t > now)
        .min()
}

/// Parses each Secret once per translation even when several Ingresses use it.
#[derive(Default)]
struct SecretCache(HashMap<(String, String), Result<CertKey, TlsError>>);

impl SecretCache {
    fn get(&mut self, index: &Index<'_>, namespace: &str, name: &str) -> Result<CertKey, TlsError> {
        self.0
            .entry((namespace.to_string(), name.to_string()))
            .or_insert_with(|| match index.secrets.get(&(namespace, name)) {
                Some(s) => load_secret(s),
                None => Err(TlsError::SecretNotFound(format!("{namespace}/{name}"))),
            })
            .clone()
    }
}

/// Build the SNI table from our Ingresses (already in precedence order) and the default
/// certificate flag.
pub(super) fn build(
    ingresses: &[&Ingress],
    index: &Index<'_>,
    opts: &Options,
    diags: &mut Diags,
) -> TlsTable {
    let mut cache = SecretCache::default();
    let mut table = TlsTable::default();
    // Which Ingress set each host's certificate, for conflict messages.
    let mut owner: HashMap<HostKey, String> = HashMap::new();

    for ing in ingresses {
        let obj = index::obj_ref(&ing.metadata);
        let Some(spec) = ing.spec.as_ref() else {
            continue;
        };
        let no_redirect = !annotations::ssl_redirect_wanted(
            ing.metadata.annotations.as_ref(),
            opts.defaults.ssl_redirect,
        );
        for entry in spec.tls.as_deref().unwrap_or_default() {
            let Some(secret_name) = entry.secret_name.as_deref().filter(|s| !s.is_empty()) else {
                // `secretName` is optional "to allow TLS routing based on SNI hostname alone"
                // (IngressTLS): the default certificate serves these hosts, and they redirect.
                if opts.default_certificate.is_none() {
                    diags.warn(
                        "Ingress",
                        &obj,
                        "MissingSecretName",
                        "tls entry without secretName: its hosts are served the generated \
                         self-signed certificate until --default-certificate names one",
                    );
                }
                if !no_redirect {
                    default_hosts(&mut table, ing, entry.hosts.as_deref(), &obj, diags);
                }
                continue;
            };
            let cert = match cache.get(index, obj.namespace, secret_name) {
                Ok(c) => c,
                Err(e) => {
                    diags.error("Ingress", &obj, e.reason(), format!("tls: {e}"));
                    continue;
                }
            };
            let hosts = entry_hosts(ing, entry.hosts.as_deref());
            if hosts.is_empty() {
                diags.warn(
                    "Ingress",
                    &obj,
                    "TlsWithoutHosts",
                    format!(
                        "tls: the entry for Secret {secret_name} lists no hosts and no rule of \
                         this Ingress names one: the certificate serves nothing (list its hosts, \
                         or make it --default-certificate)"
                    ),
                );
            }
            for host in hosts {
                let key = match hosts::parse_host(Some(host)) {
                    Ok(HostKey::CatchAll) => continue,
                    Ok(k) => k,
                    Err(e) => {
                        diags.error("Ingress", &obj, "InvalidHost", format!("tls: {e}"));
                        continue;
                    }
                };
                assign(&mut table, &mut owner, key, &cert, &obj, no_redirect, diags);
            }
        }
    }

    if let Some((ns, name)) = &opts.default_certificate {
        match cache.get(index, ns, name) {
            Ok(c) => table.default = Some(c),
            Err(e) => diags.error(
                "Secret",
                &ObjRef {
                    namespace: ns,
                    name,
                    // The Secret's own uid when it exists (invalid data), so its Event shows
                    // on `kubectl describe secret`.
                    uid: index
                        .secrets
                        .get(&(ns.as_str(), name.as_str()))
                        .and_then(|s| s.metadata.uid.as_deref())
                        .unwrap_or_default(),
                },
                e.reason(),
                format!("default certificate: {e}; the generated fallback is served"),
            ),
        }
    }
    table
}

/// Record the hosts of a TLS entry without a Secret in [`TlsTable::default_exact`] and
/// [`TlsTable::default_wildcard`].
fn default_hosts(
    table: &mut TlsTable,
    ing: &Ingress,
    hosts: Option<&[String]>,
    obj: &ObjRef<'_>,
    diags: &mut Diags,
) {
    for host in entry_hosts(ing, hosts) {
        match hosts::parse_host(Some(host)) {
            Ok(HostKey::Exact(h)) => {
                table.default_exact.insert(h);
            }
            Ok(HostKey::Wildcard(s)) => {
                table.default_wildcard.insert(s);
            }
            Ok(HostKey::CatchAll) => {}
            Err(e) => diags.error("Ingress", obj, "InvalidHost", format!("tls: {e}")),
        }
    }
}

/// Hosts a TLS entry serves. The API leaves `hosts` optional ("defaults to the wildcard host
/// setting for the loadbalancer controller"); portico reads an empty list as "every host of this
/// Ingress's rules", which is what such manifests mean in practice.
fn entry_hosts<'a>(ing: &'a Ingress, hosts: Option<&'a [String]>) -> Vec<&'a str> {
    match hosts {
        Some(h) if !h.is_empty() => h.iter().map(String::as_str).collect(),
        _ => {
            let mut v: Vec<&str> = ing
                .spec
                .as_ref()
                .and_then(|s| s.rules.as_deref())
                .unwrap_or_default()
                .iter()
                .filter_map(|r| r.host.as_deref())
                .filter(|h| !h.is_empty())
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
    }
}

/// Whether the leaf certificate of `cert` is valid for `host` by RFC 6125's rules (its
/// subjectAltName; a wildcard name covers one label). A wildcard host (`*.example.com`) needs a
/// certificate that covers every name below it, checked with a name no certificate lists.
fn names_host(cert: &CertKey, host: &HostKey) -> bool {
    let probe = match host {
        HostKey::Exact(h) => h.clone(),
        HostKey::Wildcard(suffix) => format!("portico-wildcard-probe.{suffix}"),
        HostKey::CatchAll => return true,
    };
    let Some(leaf) = cert.key.cert.first() else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(probe) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Record whether `key`'s redirect is off (the Ingress giving it its certificate says
/// `ssl-redirect: "false"`).
fn set_no_redirect(table: &mut TlsTable, key: &HostKey, no_redirect: bool) {
    match (key, no_redirect) {
        (HostKey::Exact(h), true) => table.no_redirect_exact.insert(h.clone()),
        (HostKey::Exact(h), false) => table.no_redirect_exact.remove(h),
        (HostKey::Wildcard(s), true) => table.no_redirect_wildcard.insert(s.clone()),
        (HostKey::Wildcard(s), false) => table.no_redirect_wildcard.remove(s),
        (HostKey::CatchAll, _) => false,
    };
}

fn assign(
    table: &mut TlsTable,
    owner: &mut HashMap<HostKey, String>,
    key: HostKey,
    cert: &CertKey,
    obj: &ObjRef<'_>,
    no_redirect: bool,
    diags: &mut Diags,
) {
    if !owner.contains_key(&key) {
        set_no_redirect(table, &key, no_redirect);
    }
    let slot = match &key {
        HostKey::Exact(h) => table.exact.entry(h.clone()),
        HostKey::Wildcard(s) => table.wildcard.entry(s.clone()),
        HostKey::CatchAll => return,
    };
    let this = format!("{}/{}", obj.namespace, obj.name);
    let covers = names_host(cert, &key);
    if !covers {
        diags.warn(
            "Ingress",
            obj,
            "CertificateHostMismatch",
            format!(
                "tls: certificate {} does not name host {key} (its subjectAltName): clients will \
                 refuse it for that host",
                cert.source
            ),
        );
    }
    match slot {
        Entry::Vacant(v) => {
            v.insert(cert.clone());
            owner.insert(key, this);
        }
        Entry::Occupied(mut o) => {
            // A certificate that names the host beats an older one that does not: clients would
            // refuse that one anyway.
            if covers && o.get().material != cert.material && !names_host(o.get(), &key) {
                let loser = owner.insert(key.clone(), this).unwrap_or_default();
                diags.warn(
                    "Ingress",
                    obj,
                    "TlsConflict",
                    format!(
                        "tls: host {key}: certificate {} from Ingress {loser} does not name the \
                         host; {} is used for it",
                        o.get().source,
                        cert.source
                    ),
                );
                o.insert(cert.clone());
                // The host's redirect follows the Ingress its certificate now comes from.
                set_no_redirect(table, &key, no_redirect);
                return;
            }
            // Two Secrets with identical material are the same certificate: no conflict.
            if o.get().material != cert.material {
                let winner = owner.get(&key).cloned().unwrap_or_default();
                diags.error(
                    "Ingress",
                    obj,
                    "TlsConflict",
                    format!(
                        "tls: host {key} already has certificate {} from Ingress {winner} \
                         (older, or first in namespace/name order); {} is not used for it",
                        o.get().source,
                        cert.source
                    ),
                );
            }
        }
    }
}
