//! A throwaway CA with server and client certificates. The ingress never sees any of it: TLS
//! runs end to end between the client and the dataplane.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

pub struct Pki {
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate with its key, in DER and PEM.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, "zone-ingress test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca cert");
        Self { ca_pem: ca.pem(), ca_der: ca.der().clone(), ca, ca_key }
    }

    /// A leaf for `names` (DNS or IP address SANs; other names, such as Kuma's tag SNIs, are
    /// skipped as SANs).
    pub fn leaf(&self, cn: &str, names: &[&str]) -> Leaf {
        let sans: Vec<String> = names
            .iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok() || rustls::pki_types::DnsName::try_from(**n).is_ok())
            .map(|n| (*n).to_owned())
            .collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("sign");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA");
        Arc::new(roots)
    }

    /// A dataplane's server config: requires a client certificate from this CA.
    pub fn server_config(&self, leaf: &Leaf) -> Arc<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider()).build().expect("verifier");
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
            .expect("server cert");
        Arc::new(cfg)
    }

    /// A client config presenting `leaf` and trusting this CA.
    pub fn client_config(&self, leaf: &Leaf) -> Arc<ClientConfig> {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(leaf.chain.clone(), leaf.key.clone_key())
            .expect("client cert");
        Arc::new(cfg)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
