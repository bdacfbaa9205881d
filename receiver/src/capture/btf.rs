//! Resolves the kernel struct offsets the programs read (`KernelOffsets`) from the
//! running kernel's BTF, so one binary works across kernel versions and configs
//! without kernel headers or CO-RE relocations.
use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use ridley_ebpf::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Strips typedefs and qualifiers.
fn resolve(btf: &Btf, mut ty: Type) -> Result<Type> {
    loop {
        ty = match ty {
            Type::Typedef(_)
            | Type::Volatile(_)
            | Type::Const(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                let inner = ty.as_btf_type().expect("qualifiers are BTF types");
                btf.resolve_chained_type(inner)?
            }
            other => return Ok(other),
        }
    }
}

fn size_of(btf: &Btf, ty: Type) -> Result<usize> {
    Ok(match resolve(btf, ty)? {
        Type::Int(int) => int.size(),
        Type::Ptr(_) => 8,
        Type::Enum(e) => e.size(),
        Type::Struct(s) | Type::Union(s) => s.size(),
        Type::Array(_) => 0,
        other => bail!("unexpected BTF kind {}", other.name()),
    })
}

/// Finds `name` among the members of a struct/union, descending into anonymous members.
/// Returns the byte offset and the member's type.
fn find_member(btf: &Btf, ty: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>> {
    for member in &ty.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        let member_type = btf.resolve_chained_type(member)?;
        if member_name == name {
            if member.bitfield_size().is_some_and(|bits| bits != 0) || member.bit_offset() % 8 != 0
            {
                bail!("{name} is a bitfield; it cannot be read at a byte offset");
            }
            return Ok(Some((member.bit_offset() / 8, member_type)));
        }
        if member_name.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = resolve(btf, member_type)? {
                if let Some((offset, found)) = find_member(btf, &inner, name)? {
                    return Ok(Some((member.bit_offset() / 8 + offset, found)));
                }
            }
        }
    }
    Ok(None)
}

/// Byte offset of `path` (e.g. `["__sk_common", "skc_num"]`) inside `struct root`,
/// checking that the final member is `size` bytes wide.
fn offset(btf: &Btf, root: &str, path: &[&str], size: usize) -> Result<u32> {
    let what = format!("struct {root}.{}", path.join("."));
    let mut current = btf
        .resolve_types_by_name(root)
        .with_context(|| format!("struct {root} not in BTF"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| anyhow!("struct {root} not in BTF"))?;
    let mut total = 0u32;
    for (i, name) in path.iter().enumerate() {
        let (Type::Struct(s) | Type::Union(s)) = resolve(btf, current)? else {
            bail!("{what}: {} is not a struct", path[..i].join("."));
        };
        let (off, member_type) =
            find_member(btf, &s, name)?.ok_or_else(|| anyhow!("{what}: no member {name}"))?;
        total += off;
        current = member_type;
    }
    let actual = size_of(btf, current)?;
    if actual != size {
        bail!("{what} is {actual} bytes, expected {size}");
    }
    Ok(total)
}

/// Resolves every offset the programs need. Fails with the field that is missing or
/// changed shape, which is what a user must report.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets> {
    let sock = |path: &[&str], size| offset(btf, "sock", path, size);
    let tcp = |field: &str, size| offset(btf, "tcp_sock", &[field], size);
    let offsets = KernelOffsets {
        skc_family: sock(&["__sk_common", "skc_family"], 2)?,
        skc_state: sock(&["__sk_common", "skc_state"], 1)?,
        skc_num: sock(&["__sk_common", "skc_num"], 2)?,
        skc_dport: sock(&["__sk_common", "skc_dport"], 2)?,
        skc_rcv_saddr: sock(&["__sk_common", "skc_rcv_saddr"], 4)?,
        skc_daddr: sock(&["__sk_common", "skc_daddr"], 4)?,
        skc_v6_rcv_saddr: sock(&["__sk_common", "skc_v6_rcv_saddr"], 16)?,
        skc_v6_daddr: sock(&["__sk_common", "skc_v6_daddr"], 16)?,
        skc_net: sock(&["__sk_common", "skc_net", "net"], 8)?,
        net_ns_inum: offset(btf, "net", &["ns", "inum"], 4)?,
        sk_protocol: sock(&["sk_protocol"], 2)?,
        sk_err: sock(&["sk_err"], 4)?,
        // Moved from struct sock into sock_common (as skc_flags) in 6.x.
        sk_flags: sock(&["sk_flags"], 8).or_else(|_| sock(&["__sk_common", "skc_flags"], 8))?,
        bytes_acked: tcp("bytes_acked", 8)?,
        bytes_received: tcp("bytes_received", 8)?,
        total_retrans: tcp("total_retrans", 4)?,
        srtt_us: tcp("srtt_us", 4)?,
        snd_una: tcp("snd_una", 4)?,
        write_seq: tcp("write_seq", 4)?,
        tcp_mstamp: tcp("tcp_mstamp", 8)?,
    };
    // The programs read `struct sock` fields through the `tcp_sock` pointer.
    let sock_in_tcp_sock = offset(btf, "tcp_sock", &["inet_conn", "icsk_inet", "sk"], {
        let sock_type = btf
            .resolve_types_by_name("sock")?
            .into_iter()
            .find(|t| matches!(t, Type::Struct(_)))
            .ok_or_else(|| anyhow!("struct sock not in BTF"))?;
        size_of(btf, sock_type)?
    })?;
    if sock_in_tcp_sock != 0 {
        bail!("struct sock is at offset {sock_in_tcp_sock} of struct tcp_sock, expected 0");
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF: the offsets must be distinct and plausible.
    #[test]
    fn resolves_offsets_from_running_kernel() {
        let btf = Btf::from_file(VMLINUX_BTF).expect("kernel BTF is required to run ridley");
        let o = kernel_offsets(&btf).expect("offsets resolve");
        // sock_common starts the struct: family/state/ports sit in its first 24 bytes.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.skc_dport < 24 && o.skc_num == o.skc_dport + 2);
        assert!(o.bytes_acked > o.sk_err && o.bytes_received > o.sk_err);
        assert_ne!(o.bytes_acked, o.bytes_received);
    }
}
