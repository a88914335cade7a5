//! Mutual TLS on the links between the gateway and its workers: the control plane (gRPC, through
//! tonic's TLS) and the data plane (frames, through tokio-rustls).
//!
//! Every process of a deployment holds one certificate and its key, and the CA that signed the
//! certificates of all of them. Each side of every link presents its certificate and refuses a
//! peer whose certificate that CA did not sign. The files are PEM, laid out as Kubernetes TLS
//! Secrets are (cert-manager's `tls.crt`, `tls.key` and `ca.crt`); [`CertSet::generate`] makes a
//! set (`strata certs`, and `strata serve` for its own local workers).
//!
//! Plaintext is an explicit choice ([`LinkSecurity::Plaintext`], `--insecure`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Names of the files in a certificate directory (a Kubernetes TLS Secret's keys).
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// A problem with the links' TLS material: every variant names the flag and file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {}: {problem}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The flags do not make a usable choice (a file missing, or files with --insecure).
    #[error("{0}")]
    Flags(String),
    /// The certificate, key and CA do not fit together.
    #[error("{0}")]
    Mismatch(String),
    #[error("generating certificates: {0}")]
    Generate(String),
    #[error("{}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The TLS flags of every process that takes part in a deployment (`strata serve`, `strata
/// gateway`, `strata worker`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Certificate (PEM, chain first to last) this process presents on the links between the
    /// gateway and the workers; with --tls-key and --tls-ca.
    #[arg(long, env = "STRATA_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "STRATA_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed every peer's certificate; a peer it did not sign is refused.
    #[arg(long, env = "STRATA_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Name that each peer's certificate must carry (default: the host of the address dialled;
    /// set one when peers are reached at addresses the certificates cannot name, e.g. pod IPs).
    #[arg(long, env = "STRATA_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Plaintext links between the gateway and the workers, for a trusted network only. The
    /// data plane then listens on loopback unless an address is given.
    #[arg(long, env = "STRATA_INSECURE")]
    pub insecure: bool,
}

/// The three files of a certificate set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir`.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
            ca: dir.join(CA_FILE),
        }
    }
}

impl TlsArgs {
    /// The certificate files, if all three were given; an error if only some were, or if files
    /// were given with --insecure.
    pub fn files(&self) -> Result<Option<TlsFiles>, TlsError> {
        let given = [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ];
        let missing: Vec<&str> = given
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(f, _)| *f)
            .collect();
        if missing.len() == given.len() {
            return Ok(None);
        }
        if self.insecure {
            return Err(TlsError::Flags(
                "--insecure turns TLS off: drop it, or drop --tls-cert, --tls-key and --tls-ca"
                    .into(),
            ));
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            _ => Err(TlsError::Flags(format!(
                "{} missing: --tls-cert, --tls-key and --tls-ca go together",
                missing.join(" and ")
            ))),
        }
    }

    /// How this process secures its links: the certificates given, or plaintext with
    /// --insecure. Neither is an error that says what to give.
    pub fn security(&self) -> Result<LinkSecurity, TlsError> {
        match self.files()? {
            Some(files) => Ok(LinkSecurity::Mtls(Arc::new(Tls::load(
                &files,
                self.tls_server_name.clone(),
            )?))),
            None if self.insecure => Ok(LinkSecurity::Plaintext),
            None => Err(TlsError::Flags(
                "the links between the gateway and its workers use mutual TLS: give --tls-cert, \
                 --tls-key and --tls-ca (PEM files, such as a Kubernetes TLS Secret's tls.crt, \
                 tls.key and ca.crt; `strata certs` makes a set), or --insecure for plaintext \
                 on a trusted network"
                    .into(),
            )),
        }
    }

    /// The same choice as arguments of another `strata` process (the workers `strata serve`
    /// starts).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(p) = path {
                out.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        if let Some(name) = &self.tls_server_name {
            out.extend(["--tls-server-name".to_string(), name.clone()]);
        }
        if self.insecure {
            out.push("--insecure".into());
        }
        out
    }
}

/// How a process secures its links to the others.
#[derive(Clone)]
pub enum LinkSecurity {
    /// Mutual TLS with these certificates.
    Mtls(Arc<Tls>),
    /// Plaintext (`--insecure`).
    Plaintext,
}

impl LinkSecurity {
    pub fn is_tls(&self) -> bool {
        matches!(self, LinkSecurity::Mtls(_))
    }

    /// For logs: `mtls` or `plaintext`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LinkSecurity::Mtls(_) => "mtls",
            LinkSecurity::Plaintext => "plaintext",
        }
    }
}

impl std::fmt::Debug for LinkSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Loaded certificates: the PEM text (for tonic) and the rustls configurations made from it.
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
    server_name: Option<String>,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |problem: String| TlsError::Pem {
        flag,
        path: path.to_path_buf(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (`BEGIN CERTIFICATE`)".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The host of an address: `https://host:port`, `host:port`, `[::1]:port` or a bare host.
pub fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => rest,
    }
}

impl Tls {
    /// Reads and checks a certificate set: the key must be the certificate's, and the CA must
    /// have signed the certificate (a mistake that would otherwise show up only as refused
    /// handshakes on the other side of every link).
    pub fn load(files: &TlsFiles, server_name: Option<String>) -> Result<Tls, TlsError> {
        let cert_pem = read("--tls-cert", &files.cert)?;
        let key_pem = read("--tls-key", &files.key)?;
        let ca_pem = read("--tls-ca", &files.ca)?;
        let chain = certificates("--tls-cert", &files.cert, &cert_pem)?;
        let cas = certificates("--tls-ca", &files.ca, &ca_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            flag: "--tls-key",
            path: files.key.clone(),
            problem: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|e| TlsError::Pem {
                flag: "--tls-ca",
                path: files.ca.clone(),
                problem: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let mismatch = |what: String| {
            TlsError::Mismatch(format!(
                "{} with {} and {}: {what}",
                files.cert.display(),
                files.key.display(),
                files.ca.display()
            ))
        };
        signed_by(&chain, &roots, server_name.as_deref())
            .map_err(|e| mismatch(format!("the certificate does not pass the CA's check: {e}")))?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| mismatch(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| mismatch(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| mismatch(format!("the key does not fit the certificate: {e}")))?;
        // Data-plane links are long-lived and one-way: a sender never reads, so nothing may
        // arrive for it after the handshake (unread tickets would turn its close into a reset).
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| mismatch(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| mismatch(format!("the key does not fit the certificate: {e}")))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Tls {
            cert_pem,
            key_pem,
            ca_pem,
            server_name,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The name a peer dialled at `address` must carry in its certificate.
    pub fn server_name_for(&self, address: &str) -> String {
        self.server_name
            .clone()
            .unwrap_or_else(|| host_of(address).to_string())
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }
}

/// A server's own certificate and key, read and checked, and optionally the CA that must have
/// signed its clients' certificates: TLS on the public API (`--api-tls-cert`, `--api-tls-key`,
/// `--api-tls-client-ca`).
pub struct ServerIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerIdentity {
    /// Each file comes with the flag that named it, for the error messages.
    pub fn load(
        cert: (&'static str, &Path),
        key: (&'static str, &Path),
        client_ca: Option<(&'static str, &Path)>,
    ) -> Result<ServerIdentity, TlsError> {
        let cert_pem = read(cert.0, cert.1)?;
        let key_pem = read(key.0, key.1)?;
        let chain = certificates(cert.0, cert.1, &cert_pem)?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            flag: key.0,
            path: key.1.to_path_buf(),
            problem: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        })?;
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
            .map_err(|e| {
                TlsError::Mismatch(format!(
                    "{} {} and {} {}: the key does not fit the certificate: {e}",
                    cert.0,
                    cert.1.display(),
                    key.0,
                    key.1.display()
                ))
            })?;
        let client_ca_pem = match client_ca {
            Some((flag, path)) => {
                let pem = read(flag, path)?;
                let mut roots = RootCertStore::empty();
                for ca in certificates(flag, path, &pem)? {
                    roots.add(ca).map_err(|e| TlsError::Pem {
                        flag,
                        path: path.to_path_buf(),
                        problem: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                Some(pem)
            }
            None => None,
        };
        Ok(ServerIdentity {
            cert_pem,
            key_pem,
            client_ca_pem,
        })
    }
}

/// Whether `roots` signed the first certificate of `chain` (and, when `name` is given, whether
/// it carries that name).
fn signed_by(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    name: Option<&str>,
) -> Result<(), String> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("no certificate".into());
    };
    let probe = name.unwrap_or("strata.invalid");
    let server_name = ServerName::try_from(probe.to_string())
        .map_err(|e| format!("--tls-server-name `{probe}`: {e}"))?;
    match verifier.verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        // Without a fixed name, which names peers are dialled at is known only per link.
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) if name.is_none() => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// A CA and one certificate it signed, for every process of a deployment, in PEM.
pub struct CertSet {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertSet {
    /// A fresh CA (whose key is dropped: it signs nothing more) and a certificate for `names`
    /// (DNS names or IP addresses), valid for `days` from now, for both server and client use.
    pub fn generate(names: &[String], days: u32) -> Result<CertSet, TlsError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let g = |e: rcgen::Error| TlsError::Generate(e.to_string());
        if names.is_empty() {
            return Err(TlsError::Generate(
                "give at least one name or address for the certificate".into(),
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        let not_before = now - time::Duration::hours(1);
        let not_after = now + time::Duration::days(i64::from(days.max(1)));

        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own, so that a certificate of another set is told apart by its issuer.
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("strata links CA {:x}", now.unix_timestamp_nanos()),
        );
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_key = KeyPair::generate().map_err(g)?;
        let ca_cert = ca.self_signed(&ca_key).map_err(g)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut leaf = CertificateParams::default();
        leaf.distinguished_name.push(DnType::CommonName, "strata");
        leaf.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| TlsError::Generate(format!("`{n}`: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        leaf.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.not_before = not_before;
        leaf.not_after = not_after;
        let key = KeyPair::generate().map_err(g)?;
        let cert = leaf.signed_by(&key, &issuer).map_err(g)?;
        Ok(CertSet {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `tls.crt`, `tls.key` (readable by the owner only) and `ca.crt` into `dir`
    /// (created if missing). An existing file is left alone and is an error; nothing is
    /// written then.
    pub fn write(&self, dir: &Path) -> Result<TlsFiles, TlsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let files = TlsFiles::in_dir(dir);
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        for p in [&files.cert, &files.key, &files.ca] {
            if p.exists() {
                return Err(TlsError::Write {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists already; remove it or choose another directory",
                    ),
                });
            }
        }
        for (path, text, mode) in [
            (&files.ca, &self.ca_pem, 0o644),
            (&files.cert, &self.cert_pem, 0o644),
            (&files.key, &self.key_pem, 0o600),
        ] {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|source| TlsError::Write {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn set_in(dir: &Path, names: &[&str]) -> TlsFiles {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        CertSet::generate(&names, 30).unwrap().write(dir).unwrap()
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("https://worker-0.strata:50061"), "worker-0.strata");
        assert_eq!(host_of("http://127.0.0.1:50061/"), "127.0.0.1");
        assert_eq!(host_of("10.0.0.7:50052"), "10.0.0.7");
        assert_eq!(host_of("[::1]:50052"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn a_generated_set_loads_and_a_foreign_ca_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let fa = set_in(a.path(), &["127.0.0.1", "localhost"]);
        let fb = set_in(b.path(), &["127.0.0.1"]);
        let tls = Tls::load(&fa, None).unwrap();
        assert_eq!(tls.server_name_for("https://127.0.0.1:9"), "127.0.0.1");
        assert!(Tls::load(&fa, Some("localhost".into())).is_ok());
        // A name the certificate does not carry, when it is fixed, is refused at once.
        let e = Tls::load(&fa, Some("elsewhere".into())).err().unwrap();
        assert!(
            e.to_string().contains("does not pass the CA's check"),
            "{e}"
        );
        // A's certificate with B's CA.
        let mixed = TlsFiles {
            ca: fb.ca.clone(),
            ..fa.clone()
        };
        let e = Tls::load(&mixed, None).err().unwrap().to_string();
        assert!(
            e.contains("UnknownIssuer") || e.contains("unknown issuer"),
            "{e}"
        );
        // A's certificate with B's key.
        let mixed = TlsFiles {
            key: fb.key.clone(),
            ..fa.clone()
        };
        let e = Tls::load(&mixed, None).err().unwrap().to_string();
        assert!(e.contains("key does not fit"), "{e}");
        // The key is the owner's alone, and nothing is overwritten.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fa.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = CertSet::generate(&["x".into()], 1)
            .unwrap()
            .write(a.path())
            .err()
            .unwrap();
        assert!(e.to_string().contains("exists already"), "{e}");
    }

    #[test]
    fn flags_say_what_is_missing() {
        let none = TlsArgs::default();
        let e = none.security().err().unwrap().to_string();
        assert!(e.contains("--tls-cert") && e.contains("--insecure"), "{e}");
        let partial = TlsArgs {
            tls_cert: Some("c".into()),
            ..TlsArgs::default()
        };
        let e = partial.security().err().unwrap().to_string();
        assert!(e.starts_with("--tls-key and --tls-ca missing"), "{e}");
        let both = TlsArgs {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_ca: Some("a".into()),
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(both.security().is_err());
        let missing = TlsArgs {
            insecure: false,
            ..both
        };
        let e = missing.security().err().unwrap().to_string();
        assert!(e.starts_with("--tls-cert c: "), "{e}");
        let plain = TlsArgs {
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(!plain.security().unwrap().is_tls());
        assert_eq!(plain.to_args(), ["--insecure"]);
    }
}
