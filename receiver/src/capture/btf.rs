//! Resolves the kernel struct offsets the programs read (`KernelOffsets`) from the
//! running kernel's BTF, so one binary works across kernel versions and configs
//! without kernel headers or CO-RE relocations.
//!
//! A reader of its own, not a BTF library: it needs a handful of struct members, and
//! a full parse of the kernel's BTF (over 100,000 types) costs tens of MiB at the
//! daemon's startup, the moment of its peak memory. This one keeps the file and one
//! offset per type, looks up the few types it needs, and is dropped before aya parses
//! the BTF for the loader.
use anyhow::{Context, Result, anyhow, bail};
use ridley_ebpf::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// `BTF_MAGIC` as it reads in a little-endian file.
const MAGIC: u16 = 0xeb9f;

/// The `BTF_KIND_*` values this reader walks through (`include/uapi/linux/btf.h`).
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// One `struct btf_type` header.
#[derive(Clone, Copy, Debug)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` for sized types, `type` for the others.
    size_or_type: u32,
    /// Byte position of what follows the header (members, array info, ...).
    extra: usize,
}

/// One member of a struct or union.
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The kernel's BTF, indexed but not decoded.
pub struct KernelBtf {
    data: Vec<u8>,
    /// Byte position of each type's header; type id `n` is `types[n - 1]`.
    types: Vec<usize>,
    strings: std::ops::Range<usize>,
}

impl KernelBtf {
    pub fn from_file(path: &str) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        Self::parse(data).with_context(|| format!("parsing {path}"))
    }

    fn parse(data: Vec<u8>) -> Result<Self> {
        let u16_at = |pos: usize| -> Result<u16> {
            let bytes = data
                .get(pos..pos + 2)
                .ok_or_else(|| anyhow!("truncated header"))?;
            Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
        };
        if u16_at(0)? != MAGIC {
            bail!("not BTF (or not little-endian)");
        }
        let mut btf = KernelBtf {
            types: Vec::new(),
            strings: 0..0,
            data,
        };
        let header_len = btf.u32_at(4)? as usize;
        let (type_off, type_len) = (btf.u32_at(8)? as usize, btf.u32_at(12)? as usize);
        let (str_off, str_len) = (btf.u32_at(16)? as usize, btf.u32_at(20)? as usize);
        let types = header_len + type_off..header_len + type_off + type_len;
        btf.strings = header_len + str_off..header_len + str_off + str_len;
        if types.end > btf.data.len() || btf.strings.end > btf.data.len() {
            bail!("sections run past the end of the file");
        }
        let mut pos = types.start;
        while pos < types.end {
            btf.types.push(pos);
            let header = btf.header_at(pos)?;
            let vlen = header.vlen as usize;
            pos = header.extra
                + match header.kind {
                    kind::INT | kind::VAR | kind::DECL_TAG => 4,
                    kind::ARRAY => 12,
                    kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
                    kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
                    _ => 0,
                };
        }
        Ok(btf)
    }

    fn u32_at(&self, pos: usize) -> Result<u32> {
        let bytes = self
            .data
            .get(pos..pos + 4)
            .ok_or_else(|| anyhow!("truncated at byte {pos}"))?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn header_at(&self, pos: usize) -> Result<TypeHeader> {
        let info = self.u32_at(pos + 4)?;
        Ok(TypeHeader {
            name_off: self.u32_at(pos)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(pos + 8)?,
            extra: pos + 12,
        })
    }

    fn header(&self, id: u32) -> Result<TypeHeader> {
        let pos = *id
            .checked_sub(1)
            .and_then(|i| self.types.get(i as usize))
            .ok_or_else(|| anyhow!("no BTF type {id}"))?;
        self.header_at(pos)
    }

    fn name(&self, name_off: u32) -> Result<&str> {
        let start = self.strings.start + name_off as usize;
        let tail = self
            .data
            .get(start..self.strings.end)
            .ok_or_else(|| anyhow!("name offset {name_off} out of range"))?;
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).context("a BTF name is not UTF-8")
    }

    /// The id of `struct name`.
    fn struct_named(&self, name: &str) -> Result<u32> {
        for id in 1..=self.types.len() as u32 {
            let header = self.header(id)?;
            if header.kind == kind::STRUCT && self.name(header.name_off)? == name {
                return Ok(id);
            }
        }
        bail!("struct {name} not in BTF")
    }

    /// Strips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<TypeHeader> {
        for _ in 0..32 {
            let header = self.header(id)?;
            match header.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = header.size_or_type
                }
                _ => return Ok(header),
            }
        }
        bail!("type {id}: qualifier chain too long")
    }

    fn size_of(&self, id: u32) -> Result<usize> {
        let header = self.resolve(id)?;
        Ok(match header.kind {
            kind::INT | kind::ENUM | kind::ENUM64 | kind::STRUCT | kind::UNION => {
                header.size_or_type as usize
            }
            kind::PTR => 8,
            kind::ARRAY => {
                let element = self.u32_at(header.extra)?;
                let count = self.u32_at(header.extra + 8)? as usize;
                count * self.size_of(element)?
            }
            other => bail!("unexpected BTF kind {other}"),
        })
    }

    fn members(&self, header: &TypeHeader) -> Result<Vec<Member>> {
        (0..header.vlen as usize)
            .map(|i| {
                let pos = header.extra + 12 * i;
                let offset = self.u32_at(pos + 8)?;
                let (bit_offset, bitfield_size) = if header.kind_flag {
                    (offset & 0x00ff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                Ok(Member {
                    name_off: self.u32_at(pos)?,
                    type_id: self.u32_at(pos + 4)?,
                    bit_offset,
                    bitfield_size,
                })
            })
            .collect()
    }

    /// Finds `name` among the members of a struct/union, descending into anonymous
    /// members. Returns the byte offset and the member's type id.
    fn find_member(&self, header: &TypeHeader, name: &str) -> Result<Option<(u32, u32)>> {
        for member in self.members(header)? {
            let member_name = self.name(member.name_off)?;
            if member_name == name {
                if member.bitfield_size != 0 || member.bit_offset % 8 != 0 {
                    bail!("{name} is a bitfield; it cannot be read at a byte offset");
                }
                return Ok(Some((member.bit_offset / 8, member.type_id)));
            }
            if member_name.is_empty() {
                let inner = self.resolve(member.type_id)?;
                if matches!(inner.kind, kind::STRUCT | kind::UNION) {
                    if let Some((offset, found)) = self.find_member(&inner, name)? {
                        return Ok(Some((member.bit_offset / 8 + offset, found)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` (e.g. `["__sk_common", "skc_num"]`) inside `struct root`,
    /// checking that the final member is `size` bytes wide.
    fn offset(&self, root: &str, path: &[&str], size: usize) -> Result<u32> {
        let what = format!("struct {root}.{}", path.join("."));
        let mut current = self.struct_named(root)?;
        let mut total = 0u32;
        for (i, name) in path.iter().enumerate() {
            let header = self.resolve(current)?;
            if !matches!(header.kind, kind::STRUCT | kind::UNION) {
                bail!("{what}: {} is not a struct", path[..i].join("."));
            }
            let (offset, member_type) = self
                .find_member(&header, name)?
                .ok_or_else(|| anyhow!("{what}: no member {name}"))?;
            total += offset;
            current = member_type;
        }
        let actual = self.size_of(current)?;
        if actual != size {
            bail!("{what} is {actual} bytes, expected {size}");
        }
        Ok(total)
    }
}

/// Resolves every offset the programs need. Fails with the field that is missing or
/// changed shape, which is what a user must report.
pub fn kernel_offsets(btf: &KernelBtf) -> Result<KernelOffsets> {
    let sock = |path: &[&str], size| btf.offset("sock", path, size);
    let tcp = |field: &str, size| btf.offset("tcp_sock", &[field], size);
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
        net_ns_inum: btf.offset("net", &["ns", "inum"], 4)?,
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
        tcp_clock_cache: tcp("tcp_clock_cache", 8)?,
        sk_protocol: sock(&["sk_protocol"], 2)?,
        skc_cookie: sock(&["__sk_common", "skc_cookie"], 8)?,
        sk_socket: sock(&["sk_socket"], 8)?,
    };
    // The programs read `struct sock` fields through the `tcp_sock` pointer.
    let sock_size = btf.size_of(btf.struct_named("sock")?)?;
    let sock_in_tcp_sock = btf.offset("tcp_sock", &["inet_conn", "icsk_inet", "sk"], sock_size)?;
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
        let btf = KernelBtf::from_file(VMLINUX_BTF).expect("kernel BTF is required to run ridley");
        let o = kernel_offsets(&btf).expect("offsets resolve");
        // sock_common starts the struct: family/state/ports sit in its first 24 bytes.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.skc_dport < 24 && o.skc_num == o.skc_dport + 2);
        assert!(o.bytes_acked > o.sk_err && o.bytes_received > o.sk_err);
        assert_ne!(o.bytes_acked, o.bytes_received);
        assert_eq!(o.skc_v6_rcv_saddr, o.skc_v6_daddr + 16);
    }

    /// The same offsets as bpftool, the kernel's own BTF tool, prints for the members.
    #[test]
    fn offsets_match_bpftool() {
        let Ok(out) = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX_BTF, "format", "raw"])
            .output()
        else {
            panic!("bpftool is required (make setup installs it)");
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // `[id] STRUCT 'tcp_sock' size=... vlen=...` then `\t'name' type_id=N bits_offset=B`.
        let member_bits = |structure: &str, member: &str| -> u32 {
            let start = text
                .find(&format!("STRUCT '{structure}' "))
                .unwrap_or_else(|| panic!("bpftool lists no struct {structure}"));
            let needle = format!("'{member}' type_id=");
            let line = text[start..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with('\t'))
                .find(|l| l.trim_start().starts_with(&needle))
                .unwrap_or_else(|| panic!("no member {member} in {structure}"));
            let bits = line.split("bits_offset=").nth(1).expect("bits_offset");
            bits.split_whitespace().next().unwrap().parse().unwrap()
        };
        let btf = KernelBtf::from_file(VMLINUX_BTF).unwrap();
        let o = kernel_offsets(&btf).unwrap();
        for (member, ours) in [
            ("bytes_acked", o.bytes_acked),
            ("bytes_received", o.bytes_received),
            ("total_retrans", o.total_retrans),
            ("srtt_us", o.srtt_us),
            ("tcp_mstamp", o.tcp_mstamp),
            ("tcp_clock_cache", o.tcp_clock_cache),
        ] {
            assert_eq!(
                member_bits("tcp_sock", member) / 8,
                ours,
                "tcp_sock.{member}"
            );
        }
        assert_eq!(member_bits("sock", "sk_err") / 8, o.sk_err);
        assert_eq!(member_bits("sock", "sk_protocol") / 8, o.sk_protocol);
        assert_eq!(member_bits("sock", "sk_socket") / 8, o.sk_socket);
        // sock_common is the first member of sock.
        assert_eq!(member_bits("sock_common", "skc_cookie") / 8, o.skc_cookie);
    }
}
