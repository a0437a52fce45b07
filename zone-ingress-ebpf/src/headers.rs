//! Wire headers the kernel programs read and rewrite, as `#[repr(C)]` views of packet memory
//! (network byte order; fields are read raw and converted where compared).

#[repr(C)]
pub(crate) struct EthHdr {
    pub(crate) dst: [u8; 6],
    pub(crate) src: [u8; 6],
    pub(crate) proto: u16,
}

#[repr(C)]
pub(crate) struct Ipv4Hdr {
    pub(crate) version_ihl: u8,
    pub(crate) tos: u8,
    pub(crate) tot_len: u16,
    pub(crate) id: u16,
    pub(crate) frag_off: u16,
    pub(crate) ttl: u8,
    pub(crate) protocol: u8,
    pub(crate) check: u16,
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
}

#[repr(C)]
pub(crate) struct Ipv6Hdr {
    pub(crate) version_class_flow: u32,
    pub(crate) payload_len: u16,
    pub(crate) next_header: u8,
    pub(crate) hop_limit: u8,
    pub(crate) saddr: [u32; 4],
    pub(crate) daddr: [u32; 4],
}

#[repr(C)]
pub(crate) struct TcpHdr {
    pub(crate) source: u16,
    pub(crate) dest: u16,
    pub(crate) seq: u32,
    pub(crate) ack_seq: u32,
    pub(crate) data_offset: u8,
    pub(crate) flags: u8,
    pub(crate) window: u16,
    pub(crate) check: u16,
    pub(crate) urg_ptr: u16,
}
