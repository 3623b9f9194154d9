//! TLS for `mqtts://` links: the rustls client configuration (ring, the only crypto
//! provider on devices) and plain words for handshake failures.
//!
//! Trust: the PEM file of `broker.ca_file` and only it; without one, the operating
//! system's trust store. The broker's certificate must name the URL's host (a DNS name
//! or an IP address), or `broker.tls_server_name` when set. No client certificate: the
//! server's TLS listener does not ask for one; devices log in with their password inside
//! the TLS session.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{ConnectReturnCode, ConnectionError};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::LinkError;

/// Largest CA file read (a bundle's CA, or a few of them).
const MAX_CA_FILE: u64 = 1024 * 1024;

/// TLS settings of an `mqtts://` link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file of the CA certificate(s) to trust, and only these; `None`: the operating
    /// system's trust store.
    pub ca_file: Option<PathBuf>,
    /// The name the broker's certificate must carry instead of the host.
    pub server_name: Option<String>,
}

impl TlsSettings {
    /// Where trust comes from, for messages.
    pub(crate) fn trust_source(&self) -> String {
        match &self.ca_file {
            Some(p) => format!("the CA file {}", p.display()),
            None => "the system trust store".into(),
        }
    }
}

/// Builds the client configuration on the ring provider. Fails with
/// [`LinkError::Tls`] naming the file for a missing, unreadable or non-PEM CA file, or
/// one without a usable certificate, and for a host or server name that cannot be a
/// TLS server name.
pub fn client_config(s: &TlsSettings, host: &str) -> Result<Arc<ClientConfig>, LinkError> {
    // rumqttc derives the name it hands rustls from the host; it must parse.
    ServerName::try_from(host).map_err(|_| {
        LinkError::Tls(format!(
            "broker host {host:?} is not a DNS name or IP address usable for TLS"
        ))
    })?;
    let roots = match &s.ca_file {
        Some(p) => ca_roots(p)?,
        None => system_roots()?,
    };
    // An explicit provider: no process-wide default to install or to race for.
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let config = match &s.server_name {
        None => builder.with_root_certificates(roots).with_no_client_auth(),
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                LinkError::Tls(format!(
                    "broker.tls_server_name {name:?} is not a DNS name or IP address"
                ))
            })?;
            let verifier = NameOverride::new(roots, provider, name)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

fn ca_roots(path: &Path) -> Result<RootCertStore, LinkError> {
    let err = |reason: String| LinkError::Tls(format!("CA file {}: {reason}", path.display()));
    let len = std::fs::metadata(path)
        .map_err(|e| err(format!("cannot read it: {e}")))?
        .len();
    if len > MAX_CA_FILE {
        return Err(err(format!("{len} bytes; at most {MAX_CA_FILE}")));
    }
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block in it (PEM expected)".into()));
    }
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| err(format!("certificate {} is not usable: {e}", i + 1)))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, LinkError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(LinkError::Tls(format!(
            "no CA certificate in the system trust store{why}: set broker.ca_file"
        )));
    }
    Ok(roots)
}

/// Standard WebPKI verification against a fixed name instead of the host's.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl NameOverride {
    fn new(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
        name: ServerName<'static>,
    ) -> Result<NameOverride, LinkError> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        Ok(NameOverride { inner, name })
    }
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _host: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Says why a connection attempt failed, in words an operator can act on. `tls` is
/// the link's TLS settings (`None`: plain `mqtt://`).
pub(crate) fn describe(e: &ConnectionError, endpoint: &str, tls: Option<&TlsSettings>) -> String {
    match (e, tls) {
        (
            ConnectionError::ConnectionRefused(
                code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
            ),
            _,
        ) => format!(
            "{endpoint} refused the device's credentials ({code:?}): the bundle's \
             credentials file does not match the device's broker password (provisioned with \
             `outpostctl devices add`, replaced by each `outpostctl devices bundle`)"
        ),
        (ConnectionError::Tls(t), Some(s)) => describe_tls(t, endpoint, s),
        (ConnectionError::Io(io), Some(_)) if io.kind() == io::ErrorKind::ConnectionRefused => {
            format!("cannot reach {endpoint}: {io}")
        }
        // A TLS listener answers a plain CONNECT with an alert, or hangs up.
        (
            ConnectionError::NotConnAck(_) | ConnectionError::MqttState(_) | ConnectionError::Io(_),
            None,
        ) if !is_refused(e) => format!(
            "{endpoint} broke off the MQTT handshake ({e}): if it is a TLS listener, the \
             broker URL must be mqtts://"
        ),
        _ => format!("{endpoint}: {e}"),
    }
}

fn is_refused(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused)
}

fn describe_tls(t: &rumqttc::TlsError, endpoint: &str, s: &TlsSettings) -> String {
    let io = match t {
        rumqttc::TlsError::Io(io) => io,
        rumqttc::TlsError::TLS(r) => return describe_rustls(r, endpoint, s),
        other => return format!("TLS handshake with {endpoint} failed: {other}"),
    };
    if let Some(r) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return describe_rustls(r, endpoint, s);
    }
    match io.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "TLS handshake with {endpoint} failed: the server hung up ({io}); if it is a \
             plain MQTT listener, the broker URL must be mqtt://"
        ),
        io::ErrorKind::ConnectionRefused => format!("cannot reach {endpoint}: {io}"),
        _ => format!("TLS handshake with {endpoint} failed: {io}"),
    }
}

fn describe_rustls(r: &rustls::Error, endpoint: &str, s: &TlsSettings) -> String {
    let why = match r {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "its certificate is not signed by a CA in {} (refused: an interceptor, or the \
             wrong CA file)",
            s.trust_source()
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "its certificate is not valid for the name the device expects ({r}); set \
             broker.tls_server_name if the URL's host is not the certificate's name"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "it does not speak TLS ({r}); if it is a plain MQTT listener, the broker URL \
             must be mqtt://"
        ),
        _ => r.to_string(),
    };
    format!("TLS handshake with {endpoint} failed: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ca: &Path) -> TlsSettings {
        TlsSettings {
            ca_file: Some(ca.to_owned()),
            server_name: None,
        }
    }

    fn tls_err(e: &LinkError) -> &str {
        match e {
            LinkError::Tls(m) => m,
            other => panic!("not a TLS error: {other:?}"),
        }
    }

    #[test]
    fn rejects_missing_ca_file_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.pem");
        let e = client_config(&settings(&p), "fleet.example.com").unwrap_err();
        assert!(tls_err(&e).contains("nope.pem"), "{e}");
        assert!(tls_err(&e).contains("cannot read"), "{e}");
    }

    #[test]
    fn rejects_ca_file_without_certificate_or_bad_pem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let e = client_config(&settings(&p), "fleet.example.com").unwrap_err();
        assert!(tls_err(&e).contains("no CERTIFICATE block"), "{e}");
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(&settings(&p), "fleet.example.com").unwrap_err();
        assert!(tls_err(&e).contains("ca.pem"), "{e}");
    }

    #[test]
    fn rejects_a_host_that_is_no_server_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let e = client_config(&settings(&p), "bad host!").unwrap_err();
        assert!(tls_err(&e).contains("bad host!"), "{e}");
    }

    #[test]
    fn refused_credentials_are_named_on_either_transport() {
        let dir = tempfile::tempdir().unwrap();
        let tls = settings(&dir.path().join("ca.pem"));
        for code in [
            ConnectReturnCode::BadUserNamePassword,
            ConnectReturnCode::NotAuthorized,
        ] {
            let e = ConnectionError::ConnectionRefused(code);
            for t in [None, Some(&tls)] {
                let m = describe(&e, "broker:1883", t);
                assert!(m.contains("refused the device's credentials"), "{m}");
            }
        }
        let other = ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable);
        assert!(!describe(&other, "broker:1883", None).contains("credentials"));
    }
}
