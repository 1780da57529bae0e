//! TLS for `amqps`: a rustls client configuration built from the `tls:` block.
//!
//! - `ca_file`: the CA bundle that signed the server certificate (else the
//!   platform's trust store);
//! - `cert_file` + `key_file`: a client certificate (mutual TLS; with no
//!   password the connection logs in with SASL EXTERNAL);
//! - `verify_peer: false` or `skip_verify: true`: accept any server certificate.
//!   Dangerous, so it is logged as a warning on every connection.
//!
//! We build the rustls `ClientConfig` ourselves (rather than lapin's
//! `OwnedTLSConfig`) because that is the only way to honour `skip_verify`, and it
//! accepts keys in any PEM form (PKCS#8, PKCS#1, SEC1).

use std::sync::Arc;

use async_rs::traits::Reactor;
use async_rs::{traits::RuntimeKit, Runtime};
use lapin::tcp::{AsyncTcpStream, RustlsConnector, RustlsConnectorConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::TlsConfig;
use crate::error::{Error, Result};

/// A TLS connector ready for every connection attempt (`None` when TLS is off).
pub(crate) type Tls = Option<RustlsConnector>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid_config(format!("rabbitmq.tls: {what}: {e}"))
}

/// Build the connector from the configuration; errors name the file and the problem.
pub(crate) fn config(cfg: &TlsConfig) -> Result<Tls> {
    if !cfg.enabled {
        return Ok(None);
    }
    let client_auth = if cfg.cert_file.is_empty() {
        None
    } else {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
            .and_then(|it| it.collect())
            .map_err(|e| {
                tls_err(
                    &format!("cert_file '{}' is not a PEM certificate", cfg.cert_file),
                    e,
                )
            })?;
        if cfg.key_file.is_empty() {
            return Err(Error::invalid_config(
                "rabbitmq.tls.key_file: a client certificate needs its private key",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| {
            tls_err(
                &format!("key_file '{}' is not a PEM private key", cfg.key_file),
                e,
            )
        })?;
        Some((certs, key))
    };
    let insecure = cfg.skip_verify || !cfg.verify_peer;
    let connector = if insecure {
        tracing::warn!("TLS server certificate verification is DISABLED (rabbitmq.tls.skip_verify / verify_peer: false): the connection can be intercepted");
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("protocol versions", e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider())));
        let c = match client_auth {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err("client certificate/key", e))?,
            None => builder.with_no_client_auth(),
        };
        RustlsConnector::from(c)
    } else if !cfg.ca_file.is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.ca_file)
            .and_then(|it| it.collect())
            .map_err(|e| tls_err(&format!("ca_file '{}' is not a PEM bundle", cfg.ca_file), e))?;
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err(tls_err(
                &format!("ca_file '{}'", cfg.ca_file),
                "no usable CA certificate in it",
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("protocol versions", e))?
            .with_root_certificates(roots);
        let c = match client_auth {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err("client certificate/key", e))?,
            None => builder.with_no_client_auth(),
        };
        RustlsConnector::from(c)
    } else {
        let base = RustlsConnectorConfig::new_with_platform_verifier();
        match client_auth {
            Some((certs, key)) => base.connector_with_single_cert(certs, key),
            None => base.connector_with_no_client_auth(),
        }
        .map_err(|e| tls_err("platform trust store", e))?
    };
    Ok(Some(connector))
}

/// Open an AMQP connection to `uri`, through TLS when `tls` is set.
///
/// The first TCP (and TLS) connection is opened here, before lapin starts, and
/// handed to it; lapin opens the later ones itself. lapin 4.12 starts its I/O
/// thread before it registers the handshake's promise: a connect that fails
/// at once (a refused port) in the moment between the two is reported to
/// nobody, and the connect hangs until `connect_timeout` (seen under load: 30 s
/// instead of "connection refused").
pub(crate) async fn connect(
    uri: AMQPUri,
    props: ConnectionProperties,
    tls: Tls,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    let tls = tls.filter(|_| uri.scheme == AMQPScheme::AMQPS);
    let first = std::sync::Mutex::new(Some(open_stream(&uri, &runtime, tls.as_ref()).await?));
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, rt| {
            let ready = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            match ready {
                Some(stream) => Ok(stream),
                None => open_stream(&uri, &rt, tls.as_ref()).await,
            }
        },
        props,
    )
    .await
}

/// One TCP connection to `uri`'s host (each address it resolves to, in turn),
/// through TLS when `tls` is set.
async fn open_stream<RK: RuntimeKit + Send + Sync + Clone + 'static>(
    uri: &AMQPUri,
    rt: &Runtime<RK>,
    tls: Option<&RustlsConnector>,
) -> lapin::Result<AsyncTcpStream<<RK as Reactor>::TcpStream>> {
    let host = uri.authority.host.clone();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{host} resolves to no address"),
    );
    for addr in tokio::net::lookup_host((host.as_str(), uri.authority.port)).await? {
        match AsyncTcpStream::connect(rt, addr).await {
            Ok(plain) => {
                return Ok(match tls {
                    Some(connector) => plain.into_rustls(connector, &host).await?,
                    None => plain,
                })
            }
            Err(e) => last = e,
        }
    }
    Err(last.into())
}

/// The `skip_verify` verifier: checks signatures (so the handshake is sound)
/// but trusts any certificate and host name.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
