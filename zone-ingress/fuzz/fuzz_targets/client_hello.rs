//! `client_hello::parse` must never panic, and its answers must be monotone in the buffer: once
//! a prefix is `Invalid` or `Complete`, every longer buffer gives the same answer; an
//! `Incomplete` prefix names a bound past itself, within `max_len`, and no larger than the length
//! of the hello when the whole input completes one.
//!
//! Seed it with the captured hellos in `zone-ingress/tests/fixtures/client_hello/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use zone_ingress::client_hello::{DEFAULT_MAX_CLIENT_HELLO, MAX_SNI_LEN, Parsed, parse};

/// Prefixes checked per input: all of them would make each run quadratic in the input length.
const CUTS: usize = 48;

fuzz_target!(|data: &[u8]| {
    // A leading byte below 0x10 can't start a TLS record anyway; let it pick a small peek limit
    // so that short inputs reach the `TooLarge` paths too.
    let (buf, max_len) = match data.split_first() {
        Some((&limit, rest)) if limit < 0x10 => (rest, usize::from(limit) << 6),
        _ => (data, DEFAULT_MAX_CLIENT_HELLO),
    };
    let full = parse(buf, max_len);

    let mut cuts: Vec<usize> = (0..=buf.len()).step_by((buf.len() / CUTS).max(1)).collect();
    cuts.push(buf.len().saturating_sub(1));
    if let Parsed::Complete { sni, len } = &full {
        assert!(*len <= buf.len() && *len <= max_len, "{full:?}");
        if let Some(sni) = sni {
            let name = sni.as_str().as_bytes();
            assert!(!name.is_empty() && name.len() <= MAX_SNI_LEN && !name.contains(&0));
        }
        // The hello alone is enough, and one byte less is not.
        cuts.extend([*len, len.saturating_sub(1)]);
    }

    for cut in cuts {
        let Some(prefix) = buf.get(..cut) else {
            continue;
        };
        match parse(prefix, max_len) {
            Parsed::Incomplete { need_at_least } => {
                let need = need_at_least.unwrap_or(cut + 1);
                assert!(need > cut && need <= max_len, "{cut}: need {need}");
                if let Parsed::Complete { len, .. } = &full {
                    assert!(need <= *len, "{cut}: need {need}, complete at {len}");
                }
            }
            decided => assert_eq!(decided, full, "prefix of {cut} bytes decided differently"),
        }
    }
});
