//! The kernel side of zone-ingress. Built only for the BPF target (see `zone-ingress/build.rs`);
//! on the host this file compiles to an empty `main` so `cargo build --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod headers;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod prefilter;
#[cfg(target_arch = "bpf")]
mod rare;
#[cfg(target_arch = "bpf")]
mod splice;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only satisfies the compiler.
    loop {}
}

/// Dual licence so that GPL-only helpers stay available to the programs.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
