fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zone-ingress-ebpf"));
    let ebpf = aya::Ebpf::load(obj).unwrap();
    for (n, _) in ebpf.programs() { println!("{n}"); }
}
