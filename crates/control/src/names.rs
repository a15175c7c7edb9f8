//! Ids, names and sizes as users write them: pure parsing and validation.

use std::fmt::Write;

use serde::Deserialize;

use crate::Error;

/// The kinds of resource that have ids; the prefix makes an id say what it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tenant,
    Vm,
    Volume,
    Snapshot,
    SnapshotGroup,
    Template,
    Job,
    Backup,
    Schedule,
    Run,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Tenant,
        Kind::Vm,
        Kind::Volume,
        Kind::Snapshot,
        Kind::SnapshotGroup,
        Kind::Template,
        Kind::Job,
        Kind::Backup,
        Kind::Schedule,
        Kind::Run,
    ];

    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Tenant => "ten-",
            Kind::Vm => "vm-",
            Kind::Volume => "vol-",
            Kind::Snapshot => "snap-",
            Kind::SnapshotGroup => "grp-",
            Kind::Template => "tpl-",
            Kind::Job => "job-",
            Kind::Backup => "bkp-",
            Kind::Schedule => "sch-",
            Kind::Run => "run-",
        }
    }

    /// The word used in messages ("vm ... not found").
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Tenant => "tenant",
            Kind::Vm => "vm",
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::SnapshotGroup => "snapshot group",
            Kind::Template => "template",
            Kind::Job => "job",
            Kind::Backup => "backup",
            Kind::Schedule => "schedule",
            Kind::Run => "run",
        }
    }
}

const ID_HEX_DIGITS: usize = 16;

/// `count` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS random source failing is not something a server can work around.
    getrandom::getrandom(&mut bytes).expect("the operating system's random source");
    bytes
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A fresh random id: NBD exports are named by ids, so they must be unguessable.
pub fn new_id(kind: Kind) -> String {
    format!("{}{}", kind.prefix(), to_hex(&random_bytes::<{ ID_HEX_DIGITS / 2 }>()))
}

/// A digest of a request's parts, to tell a retried request from a different one.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().to_hex().to_string()
}

/// Whether `text` has the shape of an id of any kind.
pub fn looks_like_id(text: &str) -> bool {
    Kind::ALL.iter().any(|kind| {
        text.strip_prefix(kind.prefix()).is_some_and(|rest| {
            rest.len() == ID_HEX_DIGITS && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    })
}

/// Names are short, safe in URLs and shells, and never mistaken for an id.
pub fn check_name(field: &'static str, name: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::invalid(field, format!("{field} {name:?} {why}")));
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1-63 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or a digit");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    if looks_like_id(name) {
        return bad("looks like an id; choose another name");
    }
    Ok(())
}

/// The largest volume cairn creates (the engine's limit is far above; this is the product's).
pub const MAX_SIZE: u64 = 16 << 40;
pub const SECTOR: u64 = 512;

/// A size as a request gives it: bytes, or text such as "10G" or "512MiB".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    /// The size in bytes, checked as a volume size: non-zero, whole sectors, at most 16 TiB.
    pub fn volume_bytes(&self, field: &'static str) -> Result<u64, Error> {
        let bytes = match self {
            SizeArg::Bytes(n) => *n,
            SizeArg::Text(text) => parse_size(text).ok_or_else(|| {
                Error::invalid(
                    field,
                    format!("{field} {text:?} is not a size (examples: 1073741824, \"10G\", \"512MiB\")"),
                )
            })?,
        };
        if bytes == 0 {
            return Err(Error::invalid(field, format!("{field} must be more than 0")));
        }
        if bytes % SECTOR != 0 {
            return Err(Error::invalid(field, format!("{field} must be a multiple of 512 bytes (got {bytes})")));
        }
        if bytes > MAX_SIZE {
            return Err(Error::invalid(field, format!("{field} {bytes} is above the 16 TiB limit")));
        }
        Ok(bytes)
    }
}

/// "123", "10G", "10g", "10GiB", "10GB" (binary units all) into bytes; None when malformed
/// or too large for u64.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let unit_start = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(unit_start);
    let number: u64 = digits.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("10gib"), Some(10 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("2kb"), Some(2048));
        for bad in ["", "G", "1.5G", "-1", "10X", "99999999999999999999", "20000000T"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn volume_sizes_are_checked() {
        assert_eq!(SizeArg::Text("1G".into()).volume_bytes("size").unwrap(), 1 << 30);
        assert_eq!(SizeArg::Bytes(512).volume_bytes("size").unwrap(), 512);
        for bad in [SizeArg::Bytes(0), SizeArg::Bytes(1000), SizeArg::Text("17T".into()), SizeArg::Text("x".into())] {
            match bad.volume_bytes("size") {
                Err(Error::Invalid { field: Some("size"), .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn names_are_checked_and_never_look_like_ids() {
        for good in ["web1", "db-01.prod", "A_b", "7"] {
            check_name("name", good).unwrap();
        }
        let id = new_id(Kind::Vm);
        assert!(looks_like_id(&id));
        for bad in ["", " x", "x y", "-x", "a/b", "é", &"x".repeat(64), &id] {
            assert!(check_name("name", bad).is_err(), "{bad:?}");
        }
        assert!(!looks_like_id("vm-web"));
    }

    #[test]
    fn ids_are_distinct_and_prefixed() {
        let a = new_id(Kind::Snapshot);
        assert!(a.starts_with("snap-") && a.len() == 5 + ID_HEX_DIGITS);
        assert_ne!(a, new_id(Kind::Snapshot));
    }
}
