//! Peek-only TLS `ClientHello` parser: finds the SNI a client asked for without terminating TLS.
//!
//! The ingress routes each accepted connection on the `server_name` in the client's first TLS
//! message and then forwards every byte, the hello included, unchanged. The caller peeks
//! (`recv(MSG_PEEK)`) from the start of the stream and calls [`parse`] on the whole peeked prefix
//! each time more bytes arrive: the parser keeps no state between calls, allocates nothing but the
//! returned name, and never looks past `max_len` bytes.
//!
//! Three layers are checked, each as far as the bytes present allow:
//!
//! - the record layer (RFC 5246 §6.2.1, RFC 8446 §5.1): the hello may be split over several
//!   handshake records, which are read as one stream without copying;
//! - the handshake message and the `ClientHello` body (RFC 8446 §4 and §4.1.2, which keeps the
//!   RFC 5246 §7.4.1.2 layout): every vector length is checked against its enclosing length;
//! - the `server_name` extension (RFC 6066 §3).
//!
//! The result is monotone in the buffer: every decision depends only on bytes already read, so
//! once a prefix is [`Parsed::Invalid`] or [`Parsed::Complete`], every longer buffer with that
//! prefix gives the same answer, and every proper prefix of a complete hello is
//! [`Parsed::Incomplete`]. The tests and the fuzz target (`zone-ingress/fuzz`) check this.

use std::{borrow::Borrow, fmt, str};

/// Default bound on the bytes peeked for one `ClientHello`, record headers included.
///
/// Envoy's `tls_inspector`, which a Kuma ingress runs, gives up at the same 16 KiB
/// (`TLS_MAX_CLIENT_HELLO = SSL3_RT_MAX_PLAIN_LENGTH`) and counts the connection as
/// `client_hello_too_large`; post-quantum hellos (~2 KB from Chromium) are well inside it.
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Longest `host_name` accepted, in bytes.
///
/// DNS names are at most 255 bytes (RFC 1035 §2.3.4), and Kuma clients cannot emit longer SNIs
/// because their Envoy rejects such a configuration.
pub const MAX_SNI_LEN: usize = 255;

/// `ContentType.handshake` (RFC 8446 §5.1).
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// `HandshakeType.client_hello` (RFC 8446 §4).
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// `ExtensionType.server_name` (RFC 6066 §3).
const EXTENSION_SERVER_NAME: usize = 0;
/// `NameType.host_name` (RFC 6066 §3).
const NAME_TYPE_HOST_NAME: u8 = 0;
/// `type(1) legacy_record_version(2) length(2)` (RFC 5246 §6.2.1).
const RECORD_HEADER_LEN: usize = 5;
/// `msg_type(1) length(3)` (RFC 8446 §4).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Plaintext records carry at most 2^14 bytes (RFC 5246 §6.2.1, RFC 8446 §5.1). This is the
/// looser bound RFC 5246 §6.2.2 gives compressed records: a length above it cannot be TLS at all,
/// while one in between is left to the backend's TLS stack, which refuses it (with the default
/// `max_len` such a record is `TooLarge` anyway).
const MAX_RECORD_LEN: usize = (1 << 14) + 2048;
/// `opaque legacy_session_id<0..32>` (RFC 8446 §4.1.2).
const MAX_SESSION_ID_LEN: usize = 32;
/// `Random random` (RFC 8446 §4.1.2).
const RANDOM_LEN: usize = 32;

/// What the bytes peeked so far say about the connection's `ClientHello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The `ClientHello` is complete. `len` = bytes of the TLS record(s) that carry it (what the
    /// caller peeked); any bytes after `len` (a `ChangeCipherSpec`, early data) were not examined.
    Complete {
        /// The client's `host_name`, exactly as sent; `None` when it sent no `server_name`
        /// extension or one with only non-`host_name` entries.
        sni: Option<Sni>,
        /// Length of the records carrying the hello, from the start of the stream.
        len: usize,
    },
    /// Valid so far; need more bytes.
    Incomplete {
        /// Total buffer length that would make progress, when known: a lower bound on the length
        /// of any buffer that parses as `Complete`, always greater than the length just parsed
        /// and never greater than `max_len`.
        need_at_least: Option<usize>,
    },
    /// Not a TLS `ClientHello`, malformed, or too large. More bytes will not change this.
    Invalid(Invalid),
}

/// Why a connection's first bytes are not a usable `ClientHello`; also a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Invalid {
    /// The first record is not a TLS handshake record: a first byte other than 22 (plaintext
    /// protocols, SSLv2-compatible hellos whose first byte has the high bit set) or a record
    /// version other than 3.0–3.4.
    #[error("not a TLS handshake record")]
    NotTls,
    /// A TLS handshake, but its first message is not a `ClientHello`.
    #[error("TLS handshake does not start with a ClientHello")]
    NotClientHello,
    /// Inconsistent lengths, truncated vectors, bytes left over inside the hello, zero-length or
    /// oversized records, or a non-handshake record before the hello is complete.
    #[error("malformed TLS ClientHello")]
    Malformed,
    /// The hello, with its record headers, would not fit in `max_len` bytes (Envoy's
    /// `client_hello_too_large`).
    #[error("TLS ClientHello larger than the peek limit")]
    TooLarge,
    /// The `server_name` extension is unusable: a `host_name` that is empty, longer than
    /// [`MAX_SNI_LEN`], not UTF-8 or contains a NUL byte, or more than one `host_name` (in one
    /// extension or in two `server_name` extensions), which would make routing ambiguous.
    #[error("unusable TLS server_name")]
    BadSni,
}

/// A `host_name` from a `ClientHello`: 1..=255 bytes of UTF-8 without NUL.
///
/// Deliberately not checked for hostname syntax and never case-folded: Kuma's legacy SNIs such as
/// `backend{mesh=default,version=v1}` contain `{ } = , / :` and upper case, and the control plane
/// emits identical strings on both ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sni(String);

impl Sni {
    /// Checks `name` with the rules applied to names read off the wire.
    ///
    /// # Errors
    ///
    /// [`Invalid::BadSni`] if `name` is empty, longer than [`MAX_SNI_LEN`] bytes or contains NUL.
    pub fn new(name: &str) -> Result<Self, Invalid> {
        if is_acceptable_host_name(name.as_bytes()) { Ok(Self(name.to_owned())) } else { Err(Invalid::BadSni) }
    }

    /// The name exactly as the client sent it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned `String`.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Sni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Sni {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets a `HashMap<Sni, _>` be queried with a `&str`; `Hash` and `Eq` agree with `str`'s.
impl Borrow<str> for Sni {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Sni {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Sni {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<Sni> for String {
    fn from(sni: Sni) -> Self {
        sni.0
    }
}

/// The byte rules for a `host_name`; UTF-8 is checked separately, where the bytes are a `str`.
fn is_acceptable_host_name(name: &[u8]) -> bool {
    // A NUL would let a name that looks like one string in logs and C APIs be another on the
    // wire (the classic `good.example\0.evil` certificate-name trick), so refuse it outright.
    !name.is_empty() && name.len() <= MAX_SNI_LEN && !name.contains(&0)
}

/// Parses the `ClientHello` at the start of a TCP stream.
///
/// `buf` holds every byte peeked so far, from the first byte of the connection; `max_len` bounds
/// how far the caller is willing to peek ([`DEFAULT_MAX_CLIENT_HELLO`]). Call again with a longer
/// buffer after [`Parsed::Incomplete`]; the work repeated is bounded by `max_len`.
#[must_use]
pub fn parse(buf: &[u8], max_len: usize) -> Parsed {
    let mut reader = HandshakeReader::new(buf, max_len);
    match client_hello(&mut reader) {
        Ok(host_name) => {
            // Records may not run past the hello (`open_record`), so this is a record boundary.
            debug_assert_eq!(reader.record_left, 0);
            let len = reader.pos;
            // Names were checked for UTF-8 when read, so this cannot fail, but a wrong `Sni` must
            // never be produced if it somehow did.
            let sni = match host_name {
                Some(name) => match str::from_utf8(name.as_bytes()) {
                    Ok(name) => Some(Sni(name.to_owned())),
                    Err(_) => return Parsed::Invalid(Invalid::BadSni),
                },
                None => None,
            };
            Parsed::Complete { sni, len }
        }
        Err(Stop::Invalid(invalid)) => Parsed::Invalid(invalid),
        Err(Stop::Short) => {
            Parsed::Incomplete { need_at_least: Some(reader.completion_lower_bound().max(buf.len().saturating_add(1))) }
        }
    }
}

/// Why parsing stopped before a complete hello.
#[derive(Debug)]
enum Stop {
    /// The next byte needed is past the end of the buffer.
    Short,
    /// The bytes read so far rule out a usable hello.
    Invalid(Invalid),
}

impl From<Invalid> for Stop {
    fn from(invalid: Invalid) -> Self {
        Self::Invalid(invalid)
    }
}

type Step<T> = Result<T, Stop>;

/// A `host_name` copied out of the records into a fixed buffer, so that a hello that turns out
/// incomplete or invalid costs no allocation.
struct HostName {
    bytes: [u8; MAX_SNI_LEN],
    len: usize,
}

impl HostName {
    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

/// Reads the handshake byte stream out of consecutive handshake records.
///
/// Record layer fragmentation is invisible to the caller: a read may start in one record and end
/// in the next (RFC 5246 §6.2.1: "client message boundaries are not preserved in the record
/// layer"). Headers are validated as they are reached, and only as far as the buffer goes, so a
/// wrong first byte is reported without waiting for the rest of the record.
struct HandshakeReader<'a> {
    buf: &'a [u8],
    max_len: usize,
    /// Offset in `buf` of the next unread byte.
    pos: usize,
    /// Unread handshake bytes left in the current record.
    record_left: usize,
    /// Records opened so far; only the first decides `NotTls`.
    records: usize,
    /// Handshake bytes consumed so far (offset in the reassembled handshake stream).
    consumed: usize,
    /// Handshake-stream offset where the `ClientHello` ends, once its header has been read.
    hello_end: Option<usize>,
}

impl<'a> HandshakeReader<'a> {
    fn new(buf: &'a [u8], max_len: usize) -> Self {
        Self { buf, max_len, pos: 0, record_left: 0, records: 0, consumed: 0, hello_end: None }
    }

    /// Validates the record header at `pos` and enters its fragment.
    fn open_record(&mut self) -> Step<()> {
        if self.pos.saturating_add(RECORD_HEADER_LEN) > self.max_len {
            return Err(Invalid::TooLarge.into());
        }
        // The first record decides whether this is TLS at all; a bad header after it is a broken
        // TLS stream instead: RFC 5246 §6.2.1 requires every record carrying the hello to be a
        // handshake record, and a ChangeCipherSpec or alert before its end is a protocol error.
        let not_tls = if self.records == 0 { Invalid::NotTls } else { Invalid::Malformed };
        let byte = |i: usize| -> Step<u8> { self.buf.get(self.pos.saturating_add(i)).copied().ok_or(Stop::Short) };
        // An SSLv2-compatible hello (RFC 5246 Appendix E.2) starts with a two-byte length whose
        // high bit is set. It cannot carry extensions, hence no SNI: nothing to route on.
        if byte(0)? != CONTENT_TYPE_HANDSHAKE {
            return Err(not_tls.into());
        }
        // RFC 8446 §5.1 tells receivers to ignore `legacy_record_version` (3.1 or 3.3 from current
        // clients, 3.0 from old ones); requiring 3.0-3.4 still lets a stray 0x16 byte of
        // plaintext fail fast.
        if byte(1)? != 3 || byte(2)? > 4 {
            return Err(not_tls.into());
        }
        let len = usize::from(u16::from_be_bytes([byte(3)?, byte(4)?]));
        // RFC 8446 §5.1: "Implementations MUST NOT send zero-length fragments of Handshake types".
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(Invalid::Malformed.into());
        }
        if let Some(hello_end) = self.hello_end {
            // Bytes after the hello in its last record would be a second handshake message,
            // which a client has no business sending before the server's reply (BoringSSL fails
            // the handshake with `EXCESS_HANDSHAKE_DATA` at its next key change). Refusing them
            // also makes `Complete.len` a record boundary.
            if self.consumed.saturating_add(len) > hello_end {
                return Err(Invalid::Malformed.into());
            }
        }
        let body = self.pos.saturating_add(RECORD_HEADER_LEN);
        if body.saturating_add(len) > self.max_len {
            return Err(Invalid::TooLarge.into());
        }
        self.pos = body;
        self.record_left = len;
        self.records += 1;
        self.check_fits()
    }

    /// Fails with `TooLarge` once the hello provably cannot end within `max_len`.
    fn check_fits(&self) -> Step<()> {
        if self.completion_lower_bound() > self.max_len { Err(Invalid::TooLarge.into()) } else { Ok(()) }
    }

    /// The shortest buffer that could hold the complete hello, given what has been read.
    fn completion_lower_bound(&self) -> usize {
        match self.hello_end {
            Some(hello_end) => {
                let remaining = hello_end.saturating_sub(self.consumed);
                // What the current record does not hold needs at least one more record header.
                let more_records = if remaining > self.record_left { RECORD_HEADER_LEN } else { 0 };
                self.pos.saturating_add(remaining).saturating_add(more_records)
            }
            None if self.record_left > 0 => self.pos.saturating_add(self.record_left),
            None => self.pos.saturating_add(RECORD_HEADER_LEN),
        }
    }

    /// Records where the `ClientHello` ends, once its handshake header has been read.
    fn set_hello_end(&mut self, hello_end: usize) -> Step<()> {
        // Same rule as in `open_record`, for the record that was open before the length was known.
        if self.consumed.saturating_add(self.record_left) > hello_end {
            return Err(Invalid::Malformed.into());
        }
        self.hello_end = Some(hello_end);
        self.check_fits()
    }

    /// Fails with `Malformed` unless `n` more bytes end at or before `limit`.
    fn ensure_within(&self, n: usize, limit: usize) -> Step<()> {
        if self.consumed.saturating_add(n) > limit { Err(Invalid::Malformed.into()) } else { Ok(()) }
    }

    /// Consumes `n` handshake bytes, handing each record's share of them to `sink`.
    ///
    /// `pos` and `consumed` advance together, one record's chunk at a time, so when the buffer
    /// runs out mid-read `completion_lower_bound` is still a true bound.
    fn take(&mut self, n: usize, limit: usize, mut sink: impl FnMut(&[u8])) -> Step<()> {
        self.ensure_within(n, limit)?;
        let mut left = n;
        while left > 0 {
            if self.record_left == 0 {
                self.open_record()?;
            }
            let chunk = left.min(self.record_left);
            let end = self.pos.saturating_add(chunk);
            let bytes = self.buf.get(self.pos..end).ok_or(Stop::Short)?;
            sink(bytes);
            self.pos = end;
            self.record_left -= chunk;
            self.consumed += chunk;
            left -= chunk;
        }
        Ok(())
    }

    fn skip(&mut self, n: usize, limit: usize) -> Step<()> {
        self.take(n, limit, |_| {})
    }

    /// Fills `out` from the handshake stream.
    fn read_into(&mut self, out: &mut [u8], limit: usize) -> Step<()> {
        let mut filled = 0;
        self.take(out.len(), limit, |chunk| {
            let end = filled + chunk.len();
            if let Some(dst) = out.get_mut(filled..end) {
                dst.copy_from_slice(chunk);
            }
            filled = end;
        })
    }

    fn array<const N: usize>(&mut self, limit: usize) -> Step<[u8; N]> {
        let mut out = [0; N];
        self.read_into(&mut out, limit)?;
        Ok(out)
    }

    fn u8(&mut self, limit: usize) -> Step<u8> {
        let [b] = self.array(limit)?;
        Ok(b)
    }

    fn u16(&mut self, limit: usize) -> Step<usize> {
        Ok(usize::from(u16::from_be_bytes(self.array(limit)?)))
    }

    fn u24(&mut self, limit: usize) -> Step<usize> {
        let [a, b, c] = self.array(limit)?;
        Ok((usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c))
    }
}

/// Reads the `ClientHello` handshake message; returns its `host_name`, if any.
fn client_hello(r: &mut HandshakeReader<'_>) -> Step<Option<HostName>> {
    // RFC 8446 §4: `struct { HandshakeType msg_type; uint24 length; ... } Handshake`. The client's
    // first message is REQUIRED to be a ClientHello (RFC 8446 §4.1.2).
    if r.u8(usize::MAX)? != HANDSHAKE_CLIENT_HELLO {
        return Err(Invalid::NotClientHello.into());
    }
    let body_len = r.u24(usize::MAX)?;
    let end = HANDSHAKE_HEADER_LEN + body_len;
    r.set_hello_end(end)?;

    // RFC 8446 §4.1.2 (same layout as RFC 5246 §7.4.1.2):
    //   ProtocolVersion legacy_version;                      0x0303, 0x0301 from TLS 1.0 clients
    //   Random random;
    //   opaque legacy_session_id<0..32>;
    //   CipherSuite cipher_suites<2..2^16-2>;
    //   opaque legacy_compression_methods<1..2^8-1>;
    //   Extension extensions<8..2^16-1>;                      absent in old TLS 1.0-1.2 hellos
    let [major, _minor] = r.array(end)?;
    if major != 3 {
        return Err(Invalid::Malformed.into());
    }
    r.skip(RANDOM_LEN, end)?;
    let session_id_len = usize::from(r.u8(end)?);
    if session_id_len > MAX_SESSION_ID_LEN {
        return Err(Invalid::Malformed.into());
    }
    r.skip(session_id_len, end)?;
    let suites_len = r.u16(end)?;
    if suites_len < 2 || suites_len % 2 != 0 {
        return Err(Invalid::Malformed.into());
    }
    r.skip(suites_len, end)?;
    let compression_len = usize::from(r.u8(end)?);
    if compression_len == 0 {
        return Err(Invalid::Malformed.into());
    }
    r.skip(compression_len, end)?;

    // RFC 5246 §7.4.1.2: a client may omit the extensions block altogether; such a hello
    // carries no SNI.
    if r.consumed == end {
        return Ok(None);
    }
    // The block must fill the rest of the hello exactly: anything after it is garbage, and a
    // block that overruns the hello is a length error.
    let extensions_len = r.u16(end)?;
    if r.consumed + extensions_len != end {
        return Err(Invalid::Malformed.into());
    }
    let mut host_name = None;
    let mut seen_server_name = false;
    while r.consumed < end {
        // RFC 8446 §4.2: `struct { ExtensionType extension_type; opaque extension_data<0..2^16-1>; }`
        let extension_type = r.u16(end)?;
        let data_len = r.u16(end)?;
        r.ensure_within(data_len, end)?;
        let data_end = r.consumed + data_len;
        if extension_type == EXTENSION_SERVER_NAME {
            // RFC 8446 §4.2 forbids two extensions of one type. Other duplicates are the
            // backend's business, but two server_names would let us route on a different name
            // than the one the backend acts on.
            if seen_server_name {
                return Err(Invalid::BadSni.into());
            }
            seen_server_name = true;
            host_name = server_name(r, data_end)?;
        } else {
            r.skip(data_len, data_end)?;
        }
    }
    Ok(host_name)
}

/// Reads a `server_name` extension's data, ending at `end` (RFC 6066 §3):
///
/// ```text
/// struct { NameType name_type; select (name_type) { case host_name: HostName; } name; } ServerName;
/// opaque HostName<1..2^16-1>;
/// struct { ServerName server_name_list<1..2^16-1> } ServerNameList;
/// ```
fn server_name(r: &mut HandshakeReader<'_>, end: usize) -> Step<Option<HostName>> {
    let list_len = r.u16(end)?;
    if list_len == 0 || r.consumed + list_len != end {
        return Err(Invalid::Malformed.into());
    }
    let mut found: Option<HostName> = None;
    while r.consumed < end {
        let name_type = r.u8(end)?;
        // Every name type anyone has defined (RFC 3546 included) is a 16-bit-length opaque, as
        // OpenSSL and BoringSSL parse it; that is the only way to step over unknown ones.
        let len = r.u16(end)?;
        r.ensure_within(len, end)?;
        if name_type != NAME_TYPE_HOST_NAME {
            r.skip(len, end)?;
            continue;
        }
        // RFC 6066 §3: "The ServerNameList MUST NOT contain more than one name of the same
        // name_type."
        if found.is_some() || len == 0 || len > MAX_SNI_LEN {
            return Err(Invalid::BadSni.into());
        }
        let mut name = HostName { bytes: [0; MAX_SNI_LEN], len };
        let dst = name.bytes.get_mut(..len).ok_or(Invalid::BadSni)?;
        r.read_into(dst, end)?;
        // RFC 6066 says ASCII; UTF-8 is the widest we can hand on as a `str` without guessing.
        if !is_acceptable_host_name(name.as_bytes()) || str::from_utf8(name.as_bytes()).is_err() {
            return Err(Invalid::BadSni.into());
        }
        found = Some(name);
    }
    Ok(found)
}

/// Builds one `ClientHello`, in TLS records, that asks for `sni` (sent as given, byte for byte).
///
/// This is a probe, not a TLS client: the message is syntactically valid TLS 1.3 (x25519 key
/// share, TLS 1.3 suites) and a real server answers it, but nobody holds the key for its share,
/// so no handshake can finish. Tests, the demo and benchmarks use it to send names that real
/// clients refuse to put on the wire, such as Kuma's legacy `backend{mesh=default}` or names that
/// must be rejected. Random fields are pseudo-random but deterministic in the arguments.
///
/// `extra_padding` adds a `padding` extension (RFC 7685) of that many zero bytes, to make large
/// hellos; it is reduced if the extensions block would exceed its 16-bit length, and an `sni` over
/// 65,000 bytes is cut to that. Hellos over 2^14 bytes are split over several records
/// (RFC 5246 §6.2.1).
#[must_use]
pub fn build_client_hello(sni: Option<&[u8]>, extra_padding: usize) -> Vec<u8> {
    records(&client_hello_message(sni, extra_padding), 1 << 14)
}

/// The `ClientHello` handshake message (header included) that [`build_client_hello`] wraps.
fn client_hello_message(sni: Option<&[u8]>, extra_padding: usize) -> Vec<u8> {
    /// Keeps the SNI extension and the fixed extensions inside the 16-bit extensions length.
    const MAX_PROBE_SNI: usize = 65_000;
    // Clamped again below to what is left of the block; this only keeps the arithmetic small.
    let extra_padding = extra_padding.min(usize::from(u16::MAX));

    // Seeded by the arguments so that different probes differ and the same probe is the same.
    let mut seed = 0xcbf2_9ce4_8422_2325_u64;
    for &b in sni.unwrap_or_default() {
        seed = (seed ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = SplitMix64(seed ^ u64::try_from(extra_padding).unwrap_or(u64::MAX));

    let mut extensions = Vec::with_capacity(128 + extra_padding);
    if let Some(name) = sni {
        let name = name.get(..MAX_PROBE_SNI).unwrap_or(name);
        // RFC 6066 §3: extension_data = ServerNameList of one host_name.
        put_u16(&mut extensions, EXTENSION_SERVER_NAME);
        put_u16(&mut extensions, name.len() + 5);
        put_u16(&mut extensions, name.len() + 3);
        extensions.push(NAME_TYPE_HOST_NAME);
        put_u16(&mut extensions, name.len());
        extensions.extend_from_slice(name);
    }
    // supported_versions (RFC 8446 §4.2.1): TLS 1.3 only.
    extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    // supported_groups (RFC 8446 §4.2.7): x25519.
    extensions.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    // signature_algorithms (RFC 8446 §4.2.3): ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256,
    // ed25519, rsa_pkcs1_sha256 - what certificates rcgen and Kuma's CA issue.
    extensions.extend_from_slice(&[0x00, 0x0d, 0x00, 0x0a, 0x00, 0x08, 0x04, 0x03, 0x08, 0x04, 0x08, 0x07, 0x04, 0x01]);
    // psk_key_exchange_modes (RFC 8446 §4.2.9): psk_dhe_ke, as TLS 1.3 clients usually send.
    extensions.extend_from_slice(&[0x00, 0x2d, 0x00, 0x02, 0x01, 0x01]);
    // key_share (RFC 8446 §4.2.8): one x25519 share; any 32 bytes are a valid public key.
    extensions.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
    rng.fill(&mut extensions, 32);
    if extra_padding > 0 {
        // RFC 7685: padding, zero bytes.
        let room = usize::from(u16::MAX).saturating_sub(extensions.len() + 4);
        let padding = extra_padding.min(room);
        put_u16(&mut extensions, 21);
        put_u16(&mut extensions, padding);
        extensions.resize(extensions.len() + padding, 0);
    }

    let mut body = Vec::with_capacity(80 + extensions.len());
    body.extend_from_slice(&[0x03, 0x03]); // legacy_version: TLS 1.2, as RFC 8446 §4.1.2 asks.
    rng.fill(&mut body, RANDOM_LEN);
    // A 32-byte legacy_session_id, as TLS 1.3 clients send for middlebox compatibility
    // (RFC 8446 Appendix D.4).
    body.push(32);
    rng.fill(&mut body, 32);
    // TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256.
    body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[0x01, 0x00]); // legacy_compression_methods: null only.
    put_u16(&mut body, extensions.len());
    body.extend_from_slice(&extensions);

    let mut message = Vec::with_capacity(HANDSHAKE_HEADER_LEN + body.len());
    message.push(HANDSHAKE_CLIENT_HELLO);
    let [_, a, b, c] = u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes();
    message.extend_from_slice(&[a, b, c]);
    message.extend_from_slice(&body);
    message
}

/// Wraps a handshake message in handshake records of at most `max_fragment` bytes (at least 1).
fn records(message: &[u8], max_fragment: usize) -> Vec<u8> {
    let max_fragment = max_fragment.clamp(1, usize::from(u16::MAX));
    let mut out = Vec::with_capacity(message.len() + RECORD_HEADER_LEN * message.len().div_ceil(max_fragment));
    for fragment in message.chunks(max_fragment) {
        // Record version 3.1, as TLS 1.3 clients use for the first ClientHello (RFC 8446 §5.1).
        out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 0x03, 0x01]);
        put_u16(&mut out, fragment.len());
        out.extend_from_slice(fragment);
    }
    out
}

/// Appends `value` as a big-endian `u16`; callers keep values in range.
fn put_u16(out: &mut Vec<u8>, value: usize) {
    out.extend_from_slice(&u16::try_from(value).unwrap_or(u16::MAX).to_be_bytes());
}

/// `SplitMix64`: enough randomness for probe fields, no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut Vec<u8>, n: usize) {
        let mut left = n;
        while left > 0 {
            let word = self.next().to_le_bytes();
            let take = left.min(word.len());
            out.extend_from_slice(word.get(..take).unwrap_or_default());
            left -= take;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A `ClientHello` captured from a real client; see `tests/fixtures/client_hello/README.md`.
    struct Fixture {
        name: &'static str,
        bytes: &'static [u8],
        sni: &'static str,
    }

    const FIXTURES: &[Fixture] = &[
        Fixture {
            name: "rustls-ring",
            bytes: include_bytes!("../tests/fixtures/client_hello/rustls-ring.bin"),
            sni: "a601e0c00295a9fbe.backend.8080.default.ms",
        },
        Fixture {
            name: "openssl-s_client",
            bytes: include_bytes!("../tests/fixtures/client_hello/openssl-s_client.bin"),
            sni: "backend{mesh=default,version=v1}",
        },
        Fixture {
            name: "openssl-s_client-multi-record",
            bytes: include_bytes!("../tests/fixtures/client_hello/openssl-s_client-multi-record.bin"),
            sni: "backend_kuma-demo_svc_8080{k8s.kuma.io/service-port=8080,kuma.io/protocol=http,\
                  kuma.io/zone=east,mesh=default,pod-template-hash=7d9f8b6c5d,version=v1}",
        },
        Fixture {
            name: "rustls-aws-lc-rs-mlkem",
            bytes: include_bytes!("../tests/fixtures/client_hello/rustls-aws-lc-rs-mlkem.bin"),
            sni: "a601e0c00295a9fbe.backend.8080.default.ms",
        },
        Fixture {
            name: "chromium",
            bytes: include_bytes!("../tests/fixtures/client_hello/chromium.bin"),
            sni: "a8b0b4d2e3f40718.redis.kuma-demo.6379.default.mzms",
        },
    ];

    const KUMA_SNIS: &[&str] = &[
        "backend{kuma.io/zone=east,mesh=default,version=v2}",
        "backend{mesh=default}",
        "backend_kuma-demo_svc_8080{k8s.kuma.io/service-port=8080,mesh=default}",
        "Backend{Mesh=Default,version=V1}",
        "a601e0c00295a9fbe.backend.8080.default.ms",
        "a1b2c3d4e5f60718.redis.kuma-demo.6379.default.mzms",
        "sni.msvc.default.east.kuma-demo.redis.http",
        "x",
    ];

    fn parse_default(buf: &[u8]) -> Parsed {
        parse(buf, DEFAULT_MAX_CLIENT_HELLO)
    }

    fn complete(sni: Option<&str>, len: usize) -> Parsed {
        Parsed::Complete { sni: sni.map(|s| Sni::new(s).expect("test SNI is acceptable")), len }
    }

    /// The handshake message carried by `records` (which must be well-formed).
    fn reassemble(mut records: &[u8]) -> Vec<u8> {
        let mut message = Vec::new();
        while !records.is_empty() {
            let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
            message.extend_from_slice(&records[5..5 + len]);
            records = &records[5 + len..];
        }
        message
    }

    /// The same hello in records of at most `size` bytes.
    fn refragment(records_in: &[u8], size: usize) -> Vec<u8> {
        records(&reassemble(records_in), size)
    }

    /// A `ClientHello` message (handshake header included) with the given parts.
    fn hello(session_id: &[u8], suites: &[u8], compression: &[u8], extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x5a; 32]);
        body.push(u8::try_from(session_id.len()).unwrap());
        body.extend_from_slice(session_id);
        body.extend_from_slice(&u16::try_from(suites.len()).unwrap().to_be_bytes());
        body.extend_from_slice(suites);
        body.push(u8::try_from(compression.len()).unwrap());
        body.extend_from_slice(compression);
        if let Some(extensions) = extensions {
            body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
            body.extend_from_slice(extensions);
        }
        message(HANDSHAKE_CLIENT_HELLO, &body)
    }

    fn message(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![msg_type];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        out.extend_from_slice(body);
        out
    }

    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        records(&hello(&[7; 32], &[0x13, 0x01], &[0], Some(extensions)), 1 << 14)
    }

    fn extension(extension_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = extension_type.to_be_bytes().to_vec();
        out.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// A `server_name` extension with the given `(name_type, name)` entries.
    fn server_name_extension(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        extension(0, &data)
    }

    /// Checks the monotonicity contract between prefixes of `buf` at `cuts` and `buf` itself.
    fn assert_consistent(buf: &[u8], max_len: usize, cuts: &mut Vec<usize>) {
        let full = parse(buf, max_len);
        if let Parsed::Complete { len, sni } = &full {
            assert!(*len <= buf.len() && *len <= max_len, "{full:?}");
            if let Some(sni) = sni {
                assert!(is_acceptable_host_name(sni.as_str().as_bytes()), "{sni:?}");
            }
            // The hello alone gives the same answer, and one byte less is not enough.
            cuts.push(*len);
            cuts.push(len - 1);
        }
        cuts.push(buf.len());
        cuts.retain(|&cut| cut <= buf.len());
        cuts.sort_unstable();
        cuts.dedup();
        let results: Vec<(usize, Parsed)> = cuts.iter().map(|&cut| (cut, parse(&buf[..cut], max_len))).collect();
        for pair in results.windows(2) {
            let ((short_len, short), (long_len, long)) = (&pair[0], &pair[1]);
            match short {
                Parsed::Invalid(_) | Parsed::Complete { .. } => {
                    assert_eq!(short, long, "prefix of {short_len} bytes decided, {long_len} bytes changed it")
                }
                Parsed::Incomplete { need_at_least } => {
                    let need = need_at_least.expect("the parser always knows a bound");
                    assert!(need > *short_len && need <= max_len, "{short:?} at {short_len}");
                    if let Parsed::Complete { len, .. } = long {
                        assert!(need <= *len, "{short:?} at {short_len} but complete at {len}");
                    }
                }
            }
        }
    }

    /// Every proper prefix is `Incomplete` with a bound inside the hello; the whole is `expected`.
    fn assert_every_prefix_incomplete(name: &str, buf: &[u8], expected: &Parsed) {
        for cut in 0..buf.len() {
            match parse_default(&buf[..cut]) {
                Parsed::Incomplete { need_at_least: Some(need) } if need > cut && need <= buf.len() => {}
                other => panic!("{name}: prefix of {cut}/{} bytes gave {other:?}", buf.len()),
            }
        }
        assert_eq!(&parse_default(buf), expected, "{name}");
    }

    #[test]
    fn fixtures_give_the_exact_sni() {
        for f in FIXTURES {
            assert_eq!(parse_default(f.bytes), complete(Some(f.sni), f.bytes.len()), "{}", f.name);
        }
    }

    #[test]
    fn post_quantum_fixtures_are_larger_than_one_segment() {
        // What they are here for: an X25519MLKEM768 share (1216 bytes) pushes the hello past a
        // typical 1448-byte TCP segment, so the caller must peek more than once.
        for name in ["rustls-aws-lc-rs-mlkem", "chromium"] {
            let f = FIXTURES.iter().find(|f| f.name == name).unwrap();
            assert!(f.bytes.len() > 1448, "{name}: {}", f.bytes.len());
            assert!(f.bytes.windows(4).any(|w| w == [0x11, 0xec, 0x04, 0xc0]), "{name}");
        }
    }

    #[test]
    fn every_prefix_of_a_fixture_is_incomplete() {
        for f in FIXTURES {
            assert_every_prefix_incomplete(f.name, f.bytes, &complete(Some(f.sni), f.bytes.len()));
        }
    }

    #[test]
    fn every_prefix_of_a_refragmented_fixture_is_incomplete() {
        for f in FIXTURES {
            // Splits land inside headers, vectors and the SNI itself.
            for size in [7, 100, 511] {
                let buf = refragment(f.bytes, size);
                let name = format!("{} in {size}-byte records", f.name);
                assert_every_prefix_incomplete(&name, &buf, &complete(Some(f.sni), buf.len()));
            }
        }
        let f = &FIXTURES[0];
        let buf = refragment(f.bytes, 1);
        assert_every_prefix_incomplete("1-byte records", &buf, &complete(Some(f.sni), buf.len()));
    }

    #[test]
    fn any_record_size_gives_the_same_sni() {
        for f in FIXTURES {
            for size in (1..=40).chain([255, 256, 512, 1000, 1 << 14]) {
                let buf = refragment(f.bytes, size);
                assert_eq!(parse_default(&buf), complete(Some(f.sni), buf.len()), "{} in {size}-byte records", f.name);
            }
        }
    }

    #[test]
    fn bytes_after_the_hello_are_not_examined() {
        for f in FIXTURES {
            let mut buf = f.bytes.to_vec();
            // TLS 1.3 middlebox-compatibility ChangeCipherSpec, then 0-RTT application data.
            buf.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
            buf.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x04, 1, 2, 3, 4]);
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(parse_default(&buf), complete(Some(f.sni), f.bytes.len()), "{}", f.name);
        }
    }

    #[test]
    fn flipped_or_truncated_fixtures_keep_the_parser_monotone() {
        for f in FIXTURES {
            for i in 0..f.bytes.len() {
                let prefix = parse_default(&f.bytes[..i]);
                assert!(matches!(prefix, Parsed::Incomplete { .. }), "{} cut at {i}: {prefix:?}", f.name);
                let capped = parse(f.bytes, i);
                assert!(!matches!(capped, Parsed::Complete { .. }), "{} over a cap of {i}: {capped:?}", f.name);
                for mask in [0x01, 0x80, 0xff] {
                    let mut buf = f.bytes.to_vec();
                    buf[i] ^= mask;
                    // Once a prefix is decided (complete or invalid), more bytes never change it.
                    let whole = parse_default(&buf);
                    let upto = parse_default(&buf[..=i]);
                    if !matches!(upto, Parsed::Incomplete { .. }) {
                        assert_eq!(upto, whole, "{} with byte {i} ^ {mask:#x}", f.name);
                    }
                }
            }
        }
    }

    #[test]
    fn kuma_snis_are_returned_verbatim() {
        for sni in KUMA_SNIS {
            let buf = build_client_hello(Some(sni.as_bytes()), 0);
            assert_every_prefix_incomplete(sni, &buf, &complete(Some(sni), buf.len()));
        }
    }

    #[test]
    fn sni_length_limits() {
        let name = "a".repeat(MAX_SNI_LEN);
        let buf = build_client_hello(Some(name.as_bytes()), 0);
        assert_eq!(parse_default(&buf), complete(Some(&name), buf.len()));

        let name = "a".repeat(MAX_SNI_LEN + 1);
        let buf = build_client_hello(Some(name.as_bytes()), 0);
        assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::BadSni));

        let buf = build_client_hello(Some(b""), 0);
        assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::BadSni));
    }

    #[test]
    fn sni_with_nul_or_bad_utf8_is_rejected() {
        for name in
            [&b"backend\0{mesh=default}"[..], b"\0", b"good.example\0.evil.example", b"backend{mesh=\xff}", b"\xc3"]
        {
            let buf = build_client_hello(Some(name), 0);
            assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::BadSni), "{}", name.escape_ascii());
        }
    }

    #[test]
    fn no_server_name_extension_means_no_sni() {
        let buf = build_client_hello(None, 0);
        assert_every_prefix_incomplete("no SNI", &buf, &complete(None, buf.len()));
    }

    #[test]
    fn hello_without_extensions_is_complete() {
        // TLS 1.0-1.2 clients may omit the extensions block (RFC 5246 §7.4.1.2).
        let buf = records(&hello(&[], &[0x00, 0x2f], &[0], None), 1 << 14);
        assert_every_prefix_incomplete("no extensions", &buf, &complete(None, buf.len()));
        // Likewise with an empty extensions block.
        let buf = hello_with_extensions(&[]);
        assert_eq!(parse_default(&buf), complete(None, buf.len()));
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(parse_default(b"GET / HTTP/1.1\r\n"), Parsed::Invalid(Invalid::NotTls));
        // Decided on the first byte, without waiting for a whole record header.
        assert_eq!(parse_default(b"G"), Parsed::Invalid(Invalid::NotTls));
        assert_eq!(parse_default(b"SSH-2.0-OpenSSH_9.2\r\n"), Parsed::Invalid(Invalid::NotTls));
        assert_eq!(parse_default(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Parsed::Invalid(Invalid::NotTls));
    }

    #[test]
    fn sslv2_compatible_hello_is_not_tls() {
        // RFC 5246 Appendix E.2: 2-byte length with the high bit set, msg_type 1, version 3.1.
        let hello = [0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10];
        assert_eq!(parse_default(&hello), Parsed::Invalid(Invalid::NotTls));
    }

    #[test]
    fn record_versions() {
        let f = &FIXTURES[0];
        for (version, ok) in [
            ([3, 0], true),
            ([3, 1], true),
            ([3, 2], true),
            ([3, 3], true),
            ([3, 4], true),
            ([3, 5], false),
            ([2, 0], false),
            ([4, 1], false),
        ] {
            let mut buf = f.bytes.to_vec();
            buf[1..3].copy_from_slice(&version);
            let expected = if ok { complete(Some(f.sni), f.bytes.len()) } else { Parsed::Invalid(Invalid::NotTls) };
            assert_eq!(parse_default(&buf), expected, "{version:?}");
        }
    }

    #[test]
    fn other_handshake_messages_are_not_client_hellos() {
        // A ServerHello (2) sent to the ingress, e.g. by a confused peer.
        let buf = records(&message(2, &[0x03, 0x03]), 1 << 14);
        assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::NotClientHello));
        // Decided as soon as the type byte is there.
        assert_eq!(parse_default(&buf[..6]), Parsed::Invalid(Invalid::NotClientHello));
    }

    #[test]
    fn bad_records_are_malformed() {
        // Zero-length record.
        assert_eq!(parse_default(&[22, 3, 1, 0, 0]), Parsed::Invalid(Invalid::Malformed));
        // Longer than any TLS stack sends: 2^14 + 2048 + 1.
        assert_eq!(parse_default(&[22, 3, 1, 0x48, 0x01]), Parsed::Invalid(Invalid::Malformed));
        // The largest allowed record needs more than the default limit, but not more than 64 KiB.
        assert_eq!(parse_default(&[22, 3, 1, 0x48, 0x00]), Parsed::Invalid(Invalid::TooLarge));
        assert!(matches!(parse(&[22, 3, 1, 0x48, 0x00, 1], 1 << 16), Parsed::Incomplete { .. }));
    }

    #[test]
    fn another_record_type_inside_the_hello_is_malformed() {
        let f = &FIXTURES[0];
        let mut buf = refragment(f.bytes, 100);
        // The second record becomes a ChangeCipherSpec, then an alert, then application data.
        for content_type in [20, 21, 23, 0x80] {
            buf[105] = content_type;
            assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::Malformed), "{content_type}");
        }
        // A zero-length handshake record in the middle.
        let mut buf = refragment(f.bytes, 100);
        buf.splice(105..105, [22, 3, 3, 0, 0]);
        assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::Malformed));
    }

    #[test]
    fn handshake_bytes_after_the_hello_are_malformed() {
        // In the hello's own record ...
        let mut message = hello(&[], &[0x13, 0x01], &[0], Some(&[]));
        message.extend_from_slice(&[0x0f, 0, 0, 0]);
        assert_eq!(parse_default(&records(&message, 1 << 14)), Parsed::Invalid(Invalid::Malformed));
        // ... and in a later record that starts inside the hello.
        assert_eq!(parse_default(&records(&message, 30)), Parsed::Invalid(Invalid::Malformed));
    }

    #[test]
    fn inconsistent_lengths_are_malformed() {
        let sni = server_name_extension(&[(0, b"backend{mesh=default}")]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("session id over 32 bytes", records(&hello(&[0; 33], &[0x13, 0x01], &[0], Some(&sni)), 1 << 14)),
            ("odd cipher suites", records(&hello(&[], &[0x13, 0x01, 0x13], &[0], Some(&sni)), 1 << 14)),
            ("no cipher suites", records(&hello(&[], &[], &[0], Some(&sni)), 1 << 14)),
            ("no compression methods", records(&hello(&[], &[0x13, 0x01], &[], Some(&sni)), 1 << 14)),
            ("garbage after the extensions", {
                let mut message = hello(&[], &[0x13, 0x01], &[0], Some(&sni));
                message.push(0);
                message[3] += 1; // hello length now covers the extra byte
                records(&message, 1 << 14)
            }),
            ("one byte where the extensions length belongs", {
                let mut message = hello(&[], &[0x13, 0x01], &[0], None);
                message.push(0);
                message[3] += 1;
                records(&message, 1 << 14)
            }),
            ("extension after the extensions block", {
                let mut message = hello(&[], &[0x13, 0x01], &[0], Some(&sni));
                message.extend_from_slice(&extension(0x17, &[]));
                message[3] += 4;
                records(&message, 1 << 14)
            }),
            ("extension overruns the block", {
                let mut extensions = sni.clone();
                extensions[3] += 1;
                hello_with_extensions(&extensions)
            }),
            ("empty server_name data", hello_with_extensions(&extension(0, &[]))),
            ("empty server_name list", hello_with_extensions(&extension(0, &[0, 0]))),
            ("server_name list shorter than its extension", {
                let mut extensions = sni.clone();
                extensions[5] -= 1;
                hello_with_extensions(&extensions)
            }),
            ("host_name overruns the list", {
                let mut extensions = sni.clone();
                extensions[8] += 1;
                hello_with_extensions(&extensions)
            }),
            ("hello length overruns its record", {
                let mut buf = hello_with_extensions(&sni);
                buf[8] += 1;
                buf.push(0);
                buf
            }),
        ];
        for (what, buf) in cases {
            assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::Malformed), "{what}");
        }
    }

    #[test]
    fn ambiguous_server_names_are_bad() {
        let one = server_name_extension(&[(0, b"backend{mesh=default}")]);
        let two_names = server_name_extension(&[(0, b"backend{mesh=default}"), (0, b"web{mesh=default}")]);
        assert_eq!(parse_default(&hello_with_extensions(&two_names)), Parsed::Invalid(Invalid::BadSni));
        let two_extensions = [one.as_slice(), &extension(0x17, &[]), &one].concat();
        assert_eq!(parse_default(&hello_with_extensions(&two_extensions)), Parsed::Invalid(Invalid::BadSni));
    }

    #[test]
    fn other_name_types_are_skipped() {
        let extensions = server_name_extension(&[(1, b"\x01\x02"), (0, b"backend{mesh=default}"), (7, b"")]);
        let buf = hello_with_extensions(&extensions);
        assert_eq!(parse_default(&buf), complete(Some("backend{mesh=default}"), buf.len()));
        let buf = hello_with_extensions(&server_name_extension(&[(1, b"whatever")]));
        assert_eq!(parse_default(&buf), complete(None, buf.len()));
    }

    #[test]
    fn hello_over_max_len_is_too_large() {
        let buf = build_client_hello(Some(b"backend{mesh=default}"), 20_000);
        // Two records: the first alone does not fit in 16 KiB, which its header already says.
        assert_eq!(parse_default(&buf), Parsed::Invalid(Invalid::TooLarge));
        assert_eq!(parse_default(&buf[..5]), Parsed::Invalid(Invalid::TooLarge));
        assert_eq!(parse(&buf, 1 << 16), complete(Some("backend{mesh=default}"), buf.len()));
        assert_eq!(parse(&buf, buf.len() - 1), Parsed::Invalid(Invalid::TooLarge));

        // The limit is exact, and decided from the lengths before the bytes arrive.
        let f = &FIXTURES[0];
        let len = f.bytes.len();
        assert_eq!(parse(f.bytes, len), complete(Some(f.sni), len));
        assert_eq!(parse(f.bytes, len - 1), Parsed::Invalid(Invalid::TooLarge));
        assert_eq!(parse(&f.bytes[..9], len - 1), Parsed::Invalid(Invalid::TooLarge));
        // Split over records, the extra headers count against the limit too.
        let split = refragment(f.bytes, 100);
        assert_eq!(parse(&split, split.len() - 1), Parsed::Invalid(Invalid::TooLarge));
        assert_eq!(parse(&[], 4), Parsed::Invalid(Invalid::TooLarge));
    }

    #[test]
    fn need_at_least_guides_the_next_peek() {
        let f = &FIXTURES[0];
        assert_eq!(parse_default(&[]), Parsed::Incomplete { need_at_least: Some(5) });
        assert_eq!(parse_default(&f.bytes[..3]), Parsed::Incomplete { need_at_least: Some(5) });
        // Once the record header is in, the whole record is needed.
        for cut in 5..f.bytes.len() {
            assert_eq!(parse_default(&f.bytes[..cut]), Parsed::Incomplete { need_at_least: Some(f.bytes.len()) });
        }
        // Over several records, the bound counts the next header once the hello length is known.
        let split = refragment(f.bytes, 100);
        assert_eq!(parse_default(&split[..105]), Parsed::Incomplete { need_at_least: Some(f.bytes.len() + 5) });
    }

    #[test]
    fn sni_newtype() {
        let sni = Sni::new("Backend{mesh=Default}").unwrap();
        assert_eq!(sni.as_str(), "Backend{mesh=Default}");
        assert_eq!(sni, "Backend{mesh=Default}");
        assert_eq!(sni.to_string(), "Backend{mesh=Default}");
        let mut routes = std::collections::HashMap::new();
        routes.insert(sni.clone(), 1);
        assert_eq!(routes.get("Backend{mesh=Default}"), Some(&1));
        assert_eq!(Sni::new(""), Err(Invalid::BadSni));
        assert_eq!(Sni::new("a\0b"), Err(Invalid::BadSni));
        assert_eq!(Sni::new(&"a".repeat(256)), Err(Invalid::BadSni));
        assert_eq!(String::from(sni), "Backend{mesh=Default}");
    }

    #[test]
    fn build_client_hello_is_deterministic() {
        let a = build_client_hello(Some(b"backend{mesh=default}"), 10);
        assert_eq!(a, build_client_hello(Some(b"backend{mesh=default}"), 10));
        assert_ne!(a, build_client_hello(Some(b"backend{mesh=other}"), 10));
        // Oversized arguments are clamped into a valid hello, not a panic or a broken one.
        let huge = vec![b'a'; 70_000];
        assert_eq!(parse(&build_client_hello(Some(&huge), 70_000), usize::MAX), Parsed::Invalid(Invalid::BadSni));
        for padding in [100_000, usize::MAX] {
            let padded = build_client_hello(None, padding);
            assert_eq!(parse(&padded, usize::MAX), complete(None, padded.len()));
        }
    }

    fn ring() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A `ClientHello` straight from a rustls client, as an extra real-client check at test time.
    fn rustls_hello(sni: &str, enable_sni: bool, versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.enable_sni = enable_sni;
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn live_rustls_hellos() {
        let both = rustls::ALL_VERSIONS;
        let tls12 = &[&rustls::version::TLS12];
        for sni in ["a601e0c00295a9fbe.backend.8080.default.ms", "redis.kuma-demo.svc.6379.mesh", "x"] {
            for versions in [both, tls12] {
                let buf = rustls_hello(sni, true, versions);
                assert_eq!(parse_default(&buf), complete(Some(sni), buf.len()), "{sni}");
            }
        }
        let buf = rustls_hello("a601e0c00295a9fbe.backend.8080.default.ms", false, both);
        assert_eq!(parse_default(&buf), complete(None, buf.len()));
    }

    #[test]
    fn rustls_server_accepts_the_probe() {
        // The probe is only useful if real servers take it for a ClientHello.
        let name = "a601e0c00295a9fbe.backend.8080.default.ms";
        let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        for padding in [0, 1000] {
            let mut server = rustls::ServerConnection::new(Arc::new(config.clone())).unwrap();
            let hello = build_client_hello(Some(name.as_bytes()), padding);
            server.read_tls(&mut hello.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            assert_eq!(server.server_name(), Some(name));
            assert!(server.wants_write(), "server has a ServerHello to send");
        }
    }

    /// xorshift64: a fixed, dependency-free sequence for the randomized test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
        }
    }

    #[test]
    fn randomized_mutations_are_consistent() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut seeds: Vec<Vec<u8>> = FIXTURES.iter().map(|f| f.bytes.to_vec()).collect();
        seeds.extend(KUMA_SNIS.iter().map(|s| build_client_hello(Some(s.as_bytes()), 0)));
        seeds.push(build_client_hello(None, 300));
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let seed = &seeds[rng.below(seeds.len())];
            let mut buf = if rng.below(4) == 0 { refragment(seed, 1 + rng.below(600)) } else { seed.clone() };
            for _ in 0..=rng.below(4) {
                if buf.is_empty() {
                    break;
                }
                // Structure lives near the front and in length fields: aim there half the time.
                let at = if rng.below(2) == 0 { rng.below(buf.len().min(80)) } else { rng.below(buf.len()) };
                let byte = u8::try_from(rng.next() & 0xff).unwrap();
                match rng.below(8) {
                    0 => buf[at] ^= 1 << rng.below(8),
                    1 => buf[at] = byte,
                    2 => buf[at] = buf[at].wrapping_add(1),
                    3 => buf[at] = buf[at].wrapping_sub(1),
                    4 => buf.truncate(at),
                    5 => buf.insert(at, byte),
                    6 => {
                        buf.remove(at);
                    }
                    _ => {
                        let tail = buf[at..].to_vec();
                        buf.extend_from_slice(&tail);
                    }
                }
            }
            let max_len = if rng.below(4) == 0 { rng.below(buf.len() + 64) } else { DEFAULT_MAX_CLIENT_HELLO };
            let mut cuts: Vec<usize> = (0..6).map(|_| rng.below(buf.len() + 1)).collect();
            assert_consistent(&buf, max_len, &mut cuts);
            counts[match parse(&buf, max_len) {
                Parsed::Complete { .. } => 0,
                Parsed::Incomplete { .. } => 1,
                Parsed::Invalid(_) => 2,
            }] += 1;
        }
        // The mutations must exercise every outcome, or the test proves little.
        assert!(counts.iter().all(|&n| n > 500), "complete/incomplete/invalid: {counts:?}");
    }
}
