//! Why a connection was closed before it reached a backend: one enum with, for each reason
//! (the parser's [`client_hello::Invalid`] and the route table's [`routing::Reject`] included),
//! the metric label (`zone_ingress_rejected_connections_total{reason}` and the access log's
//! `reason`), the log text, and which of Envoy's listener counters it also moves.

use std::fmt;

use crate::{client_hello, routing};

/// Why a connection was closed before it reached a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The first record is not a TLS handshake record (and no `--plaintext-route`).
    NotTls,
    /// A TLS handshake whose first message is not a ClientHello.
    NotClientHello,
    /// A ClientHello with inconsistent lengths or records.
    Malformed,
    /// A ClientHello larger than the peek limit.
    TooLarge,
    /// An unusable `server_name` (empty, too long, not UTF-8, several names).
    BadSni,
    /// No route for this SNI.
    UnknownSni,
    /// A tag SNI that Kuma never generates.
    NotCanonical,
    /// A canonical subset that matches no healthy endpoint.
    NoEndpoints,
    /// Not a name at all.
    InvalidSni,
    /// A ClientHello without `server_name`.
    NoSni,
    /// No complete ClientHello within `--client-hello-timeout`.
    ClientHelloTimeout,
    /// The client closed (or failed) before its ClientHello was complete.
    ClientClosed,
    /// No mesh has any service: the client got Kuma's `{"proxy","zone"}` answer.
    EmptyTable,
    /// The cluster's connection cap (`--max-connections-per-cluster`) was reached.
    ClusterOverflow,
    /// Every connect attempt failed or timed out.
    ConnectFailed,
    /// `--max-pending-handshakes` connections were already waiting for their ClientHello.
    HandshakeOverflow,
}

impl RejectReason {
    /// Every reason, in export order (each is exported from the start, so a rate over a reason
    /// that never happened is 0, not absent).
    pub const ALL: [Self; 16] = [
        Self::NotTls,
        Self::NotClientHello,
        Self::Malformed,
        Self::TooLarge,
        Self::BadSni,
        Self::UnknownSni,
        Self::NotCanonical,
        Self::NoEndpoints,
        Self::InvalidSni,
        Self::NoSni,
        Self::ClientHelloTimeout,
        Self::ClientClosed,
        Self::EmptyTable,
        Self::ClusterOverflow,
        Self::ConnectFailed,
        Self::HandshakeOverflow,
    ];

    /// Position in [`RejectReason::ALL`] (counter slot).
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The metric label and access-log `reason`: stable `snake_case`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::NotClientHello => "not_client_hello",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::BadSni => "bad_sni",
            Self::UnknownSni => "unknown_sni",
            Self::NotCanonical => "not_canonical",
            Self::NoEndpoints => "no_endpoints",
            Self::InvalidSni => "invalid_sni",
            Self::NoSni => "no_sni",
            Self::ClientHelloTimeout => "client_hello_timeout",
            Self::ClientClosed => "client_closed",
            Self::EmptyTable => "empty_table",
            Self::ClusterOverflow => "cluster_overflow",
            Self::ConnectFailed => "connect_failed",
            Self::HandshakeOverflow => "handshake_overflow",
        }
    }

    /// What happened, for people.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::NotTls => "not a TLS handshake record",
            Self::NotClientHello => "TLS handshake does not start with a ClientHello",
            Self::Malformed => "malformed TLS ClientHello",
            Self::TooLarge => "TLS ClientHello larger than the peek limit",
            Self::BadSni => "unusable TLS server_name",
            Self::UnknownSni => "no route for this SNI",
            Self::NotCanonical => "tag SNI is not in Kuma's canonical form",
            Self::NoEndpoints => "no endpoint matches the requested subset",
            Self::InvalidSni => "malformed SNI",
            Self::NoSni => "ClientHello without server_name",
            Self::ClientHelloTimeout => "no complete ClientHello in time",
            Self::ClientClosed => "client closed before its ClientHello was complete",
            Self::EmptyTable => "no service in any mesh: answered with the proxy and zone",
            Self::ClusterOverflow => "the cluster's connection cap is reached",
            Self::ConnectFailed => "no endpoint could be connected",
            Self::HandshakeOverflow => "too many connections are waiting for their ClientHello",
        }
    }

    /// Reasons Envoy counts as `no_filter_chain_match`: no filter chain for this SNI (or none
    /// at all).
    #[must_use]
    pub const fn no_filter_chain_match(self) -> bool {
        matches!(
            self,
            Self::NoSni
                | Self::UnknownSni
                | Self::NotCanonical
                | Self::InvalidSni
                | Self::NotTls
                | Self::NotClientHello
                | Self::Malformed
                | Self::BadSni
                | Self::ClientHelloTimeout
        )
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl From<client_hello::Invalid> for RejectReason {
    fn from(invalid: client_hello::Invalid) -> Self {
        match invalid {
            client_hello::Invalid::NotTls => Self::NotTls,
            client_hello::Invalid::NotClientHello => Self::NotClientHello,
            client_hello::Invalid::Malformed => Self::Malformed,
            client_hello::Invalid::TooLarge => Self::TooLarge,
            client_hello::Invalid::BadSni => Self::BadSni,
        }
    }
}

impl From<routing::Reject> for RejectReason {
    fn from(reject: routing::Reject) -> Self {
        match reject {
            routing::Reject::UnknownSni => Self::UnknownSni,
            routing::Reject::NotCanonical => Self::NotCanonical,
            routing::Reject::NoEndpoints => Self::NoEndpoints,
            routing::Reject::InvalidSni => Self::InvalidSni,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_labels_are_unique() {
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        let labels: std::collections::BTreeSet<&str> = RejectReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }

    #[test]
    fn parser_and_routing_reasons_map_to_their_own_labels() {
        assert_eq!(RejectReason::from(client_hello::Invalid::TooLarge).label(), "too_large");
        assert_eq!(RejectReason::from(client_hello::Invalid::NotTls).label(), "not_tls");
        assert_eq!(RejectReason::from(routing::Reject::NotCanonical).label(), "not_canonical");
        assert_eq!(RejectReason::from(routing::Reject::NoEndpoints).label(), "no_endpoints");
    }
}
