//! The memcached ascii protocol as ARCUS serves it: request encoding, key checks and reply
//! parsing. Pure functions only; the socket side is in `connection.rs`.

use crate::error::KeyError;

/// Longest key the Java client accepts (`KeyValidator.MAX_KEY_LENGTH`). Stock memcached stops at
/// 250 bytes; set [`crate::ClientOptions::max_key_len`] to 250 for such servers.
pub const MAX_KEY_LEN: usize = 4000;
/// Key length limit of stock memcached (`KEY_MAX_LENGTH`).
pub const MEMCACHED_MAX_KEY_LEN: usize = 250;
/// Default largest value: memcached's 1 MiB item limit less room for the item header, the key
/// (up to [`MAX_KEY_LEN`]) and the CAS/suffix fields.
pub const DEFAULT_MAX_VALUE_LEN: usize = 1024 * 1024 - 8 * 1024;
/// ARCUS's key prefix delimiter.
pub const PREFIX_DELIMITER: u8 = b':';

/// Checks a key the way arcus-java-client's `KeyValidator.validateKey` does, but stricter on
/// characters: 1..=`max_len` bytes, no space or ASCII control byte (memcached splits its command
/// line on spaces and ends it at CR/LF), and when the key has a `:` the prefix before it holds
/// only `[A-Za-z0-9_+.{}-]` and does not start with `-` (ARCUS prefix rules).
pub fn validate_key(key: &[u8], max_len: usize) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    if let Some(offset) = key.iter().position(|&b| b <= b' ' || b == 0x7f) {
        return Err(KeyError::InvalidByte {
            offset,
            byte: key[offset],
        });
    }
    if let Some(end) = key.iter().position(|&b| b == PREFIX_DELIMITER) {
        let prefix = &key[..end];
        let ok = |b: &u8| b.is_ascii_alphanumeric() || b"_-+.{}".contains(b);
        if key[0] == b'-' || !prefix.iter().all(ok) {
            return Err(KeyError::InvalidPrefix);
        }
    }
    Ok(())
}

/// Storage commands (`set`, `add`, ... `cas`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreCommand {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas(u64),
}

impl StoreCommand {
    pub fn name(self) -> &'static str {
        match self {
            StoreCommand::Set => "set",
            StoreCommand::Add => "add",
            StoreCommand::Replace => "replace",
            StoreCommand::Append => "append",
            StoreCommand::Prepend => "prepend",
            StoreCommand::Cas(_) => "cas",
        }
    }
}

/// Outcome of a storage command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreStatus {
    /// `STORED`
    Stored,
    /// `NOT_STORED`: `add` on an existing key, `replace`/`append`/`prepend` on a missing one.
    NotStored,
    /// `EXISTS`: `cas` whose unique no longer matches (someone changed the item).
    Exists,
    /// `NOT_FOUND`: `cas` on a missing key.
    NotFound,
}

impl StoreStatus {
    pub fn is_stored(self) -> bool {
        self == StoreStatus::Stored
    }
}

/// An item read by `get`/`gets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub value: Vec<u8>,
    pub flags: u32,
    /// The CAS unique, present for `gets`.
    pub cas: Option<u64>,
}

pub fn encode_store(
    buf: &mut Vec<u8>,
    cmd: StoreCommand,
    key: &str,
    flags: u32,
    exptime: i64,
    data: &[u8],
) {
    use std::io::Write;
    let _ = write!(buf, "{} {key} {flags} {exptime} {}", cmd.name(), data.len());
    if let StoreCommand::Cas(unique) = cmd {
        let _ = write!(buf, " {unique}");
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\r\n");
}

/// `get k1 k2 ...` or `gets ...`.
pub fn encode_retrieve<'a>(
    buf: &mut Vec<u8>,
    with_cas: bool,
    keys: impl IntoIterator<Item = &'a str>,
) {
    buf.extend_from_slice(if with_cas { b"gets" } else { b"get" });
    for k in keys {
        buf.push(b' ');
        buf.extend_from_slice(k.as_bytes());
    }
    buf.extend_from_slice(b"\r\n");
}

/// A one-line command: words joined by spaces, CRLF-terminated.
pub fn encode_line(buf: &mut Vec<u8>, words: &[&str]) {
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            buf.push(b' ');
        }
        buf.extend_from_slice(w.as_bytes());
    }
    buf.extend_from_slice(b"\r\n");
}

/// True for the error replies every command may get instead of its own:
/// `ERROR`, `ERROR <msg>` (ARCUS), `ERROR: <msg>` (stock memcached, e.g. a disabled
/// `shutdown`), `CLIENT_ERROR <msg>`, `SERVER_ERROR <msg>`.
pub fn is_error_reply(line: &[u8]) -> bool {
    line.starts_with(b"ERROR")
        || line.starts_with(b"CLIENT_ERROR")
        || line.starts_with(b"SERVER_ERROR")
}

/// True when the server says it does not know the command: stock memcached's bare `ERROR`,
/// ARCUS's `ERROR unknown command`.
pub fn is_unknown_command(line: &[u8]) -> bool {
    line == b"ERROR" || line.starts_with(b"ERROR unknown command")
}

pub fn parse_store_reply(line: &[u8]) -> Option<StoreStatus> {
    Some(match line {
        b"STORED" => StoreStatus::Stored,
        b"NOT_STORED" => StoreStatus::NotStored,
        b"EXISTS" => StoreStatus::Exists,
        b"NOT_FOUND" => StoreStatus::NotFound,
        _ => return None,
    })
}

/// Header of one item in a `get`/`gets` reply.
#[derive(Debug, PartialEq, Eq)]
pub struct ValueHeader<'a> {
    pub key: &'a str,
    pub flags: u32,
    pub len: usize,
    pub cas: Option<u64>,
}

/// Parses `VALUE <key> <flags> <bytes> [<cas unique>]`.
pub fn parse_value_header(line: &[u8]) -> Option<ValueHeader<'_>> {
    let line = std::str::from_utf8(line).ok()?;
    let mut it = line.split(' ');
    if it.next()? != "VALUE" {
        return None;
    }
    let key = it.next()?;
    let flags = it.next()?.parse().ok()?;
    let len = it.next()?.parse().ok()?;
    let cas = match it.next() {
        Some(c) => Some(c.parse().ok()?),
        None => None,
    };
    if it.next().is_some() {
        return None;
    }
    Some(ValueHeader {
        key,
        flags,
        len,
        cas,
    })
}

/// Parses `STAT <name> <value>`; the value is the rest of the line.
pub fn parse_stat_line(line: &[u8]) -> Option<(String, String)> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("STAT ")?;
    let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((name.to_string(), value.to_string()))
}

/// Item type letters of ARCUS's `scan key` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemType {
    /// `K`: key-value item.
    KeyValue,
    /// `L`: list.
    List,
    /// `S`: set.
    Set,
    /// `M`: map.
    Map,
    /// `B`: b+tree.
    BTree,
}

impl ItemType {
    pub fn letter(self) -> char {
        match self {
            ItemType::KeyValue => 'K',
            ItemType::List => 'L',
            ItemType::Set => 'S',
            ItemType::Map => 'M',
            ItemType::BTree => 'B',
        }
    }

    pub fn from_letter(c: &str) -> Option<ItemType> {
        Some(match c {
            "K" => ItemType::KeyValue,
            "L" => ItemType::List,
            "S" => ItemType::Set,
            "M" => ItemType::Map,
            "B" => ItemType::BTree,
            _ => return None,
        })
    }
}

/// One key listed by `scan key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedKey {
    pub key: String,
    pub item_type: ItemType,
    /// Seconds left: `0` never expires, `-1` sticky, `-2` already expired, else seconds.
    pub exptime: i64,
}

/// Parses the `KEYS <count> <next cursor>` header of a `scan key` reply.
pub fn parse_scan_header(line: &[u8]) -> Option<(usize, String)> {
    let line = std::str::from_utf8(line).ok()?;
    let mut it = line.split(' ');
    if it.next()? != "KEYS" {
        return None;
    }
    let count = it.next()?.parse().ok()?;
    let cursor = it.next()?.to_string();
    if it.next().is_some() {
        return None;
    }
    Some((count, cursor))
}

/// Parses one `<key> <type> <exptime>` line of a `scan key` reply.
pub fn parse_scan_item(line: &[u8]) -> Option<ScannedKey> {
    let line = std::str::from_utf8(line).ok()?;
    let mut it = line.rsplitn(3, ' ');
    let exptime = it.next()?.parse().ok()?;
    let item_type = ItemType::from_letter(it.next()?)?;
    let key = it.next()?;
    if key.is_empty() {
        return None;
    }
    Some(ScannedKey {
        key: key.to_string(),
        item_type,
        exptime,
    })
}

/// One item from stock memcached's `lru_crawler metadump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadumpEntry {
    /// The key, URL-decoded.
    pub key: String,
    /// Absolute expiry (unix time), `None` for no expiry (`exp=-1`).
    pub exp: Option<i64>,
    /// Last access (unix time).
    pub last_access: i64,
    pub cas: u64,
    /// Whether it was fetched since stored (`fetch=yes|no`).
    pub fetched: bool,
    /// Slab class.
    pub class: u32,
    /// Total item size in bytes.
    pub size: u64,
}

/// Parses `key=<url-encoded> exp=<unix|-1> la=<unix> cas=<n> fetch=<yes|no> cls=<n> size=<n>`.
/// Unknown fields are ignored (newer memcached versions add some).
pub fn parse_metadump_line(line: &[u8]) -> Option<MetadumpEntry> {
    let line = std::str::from_utf8(line).ok()?;
    let mut e = MetadumpEntry {
        key: String::new(),
        exp: None,
        last_access: 0,
        cas: 0,
        fetched: false,
        class: 0,
        size: 0,
    };
    let mut have_key = false;
    for field in line.split(' ') {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "key" => {
                e.key = url_decode(v)?;
                have_key = true;
            }
            "exp" => e.exp = Some(v.parse::<i64>().ok()?).filter(|x| *x >= 0),
            "la" => e.last_access = v.parse().ok()?,
            "cas" => e.cas = v.parse().ok()?,
            "fetch" => e.fetched = v == "yes",
            "cls" => e.class = v.parse().ok()?,
            "size" => e.size = v.parse().ok()?,
            _ => {}
        }
    }
    have_key.then_some(e)
}

/// Decodes `%XX` escapes (memcached's `uriencode` of keys in metadump).
pub fn url_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules() {
        assert_eq!(validate_key(b"", 250), Err(KeyError::Empty));
        assert_eq!(
            validate_key(&[b'a'; 251], 250),
            Err(KeyError::TooLong { len: 251, max: 250 })
        );
        assert!(validate_key(&[b'a'; 250], 250).is_ok());
        assert!(validate_key(&[b'a'; 4000], MAX_KEY_LEN).is_ok());
        assert_eq!(
            validate_key(b"a b", 250),
            Err(KeyError::InvalidByte {
                offset: 1,
                byte: b' '
            })
        );
        assert_eq!(
            validate_key(b"a\r\n", 250),
            Err(KeyError::InvalidByte {
                offset: 1,
                byte: b'\r'
            })
        );
        assert_eq!(
            validate_key(b"a\tb", 250),
            Err(KeyError::InvalidByte {
                offset: 1,
                byte: b'\t'
            })
        );
        assert_eq!(
            validate_key(b"\0", 250),
            Err(KeyError::InvalidByte { offset: 0, byte: 0 })
        );
        assert!(validate_key("kubernetes:arcus".as_bytes(), 250).is_ok());
        assert!(validate_key("a.b-c_d+{e}:rest:with:colons".as_bytes(), 250).is_ok());
        assert!(validate_key("한글키".as_bytes(), 250).is_ok());
        assert_eq!(validate_key(b"-bad:x", 250), Err(KeyError::InvalidPrefix));
        assert_eq!(
            validate_key(b"bad@prefix:x", 250),
            Err(KeyError::InvalidPrefix)
        );
        assert!(validate_key(b"-no-delimiter", 250).is_ok());
    }

    #[test]
    fn encodes_storage_commands() {
        let mut b = Vec::new();
        encode_store(&mut b, StoreCommand::Set, "k", 5, 10, b"hello");
        assert_eq!(b, b"set k 5 10 5\r\nhello\r\n");
        b.clear();
        encode_store(&mut b, StoreCommand::Cas(77), "k", 0, 0, b"");
        assert_eq!(b, b"cas k 0 0 0 77\r\n\r\n");
        b.clear();
        encode_retrieve(&mut b, true, ["a", "b"]);
        assert_eq!(b, b"gets a b\r\n");
        b.clear();
        encode_line(&mut b, &["incr", "k", "3"]);
        assert_eq!(b, b"incr k 3\r\n");
    }

    #[test]
    fn parses_replies() {
        assert_eq!(parse_store_reply(b"STORED"), Some(StoreStatus::Stored));
        assert_eq!(
            parse_store_reply(b"NOT_STORED"),
            Some(StoreStatus::NotStored)
        );
        assert_eq!(parse_store_reply(b"EXISTS"), Some(StoreStatus::Exists));
        assert_eq!(parse_store_reply(b"NOT_FOUND"), Some(StoreStatus::NotFound));
        assert_eq!(parse_store_reply(b"DELETED"), None);
        assert_eq!(
            parse_value_header(b"VALUE k 3 5"),
            Some(ValueHeader {
                key: "k",
                flags: 3,
                len: 5,
                cas: None
            })
        );
        assert_eq!(
            parse_value_header(b"VALUE k 0 5 99"),
            Some(ValueHeader {
                key: "k",
                flags: 0,
                len: 5,
                cas: Some(99)
            })
        );
        assert_eq!(parse_value_header(b"VALUE k x 5"), None);
        assert_eq!(parse_value_header(b"END"), None);
        assert!(is_error_reply(b"ERROR"));
        assert!(is_error_reply(b"ERROR unknown command"));
        assert!(is_error_reply(b"CLIENT_ERROR bad data chunk"));
        assert!(is_error_reply(b"SERVER_ERROR out of memory storing object"));
        assert!(is_error_reply(b"ERROR: shutdown not enabled"));
        assert!(!is_error_reply(b"STORED"));
        assert!(is_unknown_command(b"ERROR"));
        assert!(is_unknown_command(b"ERROR unknown command"));
        assert!(!is_unknown_command(b"ERROR not using ZooKeeper"));
    }

    #[test]
    fn parses_admin_lines() {
        assert_eq!(
            parse_stat_line(b"STAT curr_items 12"),
            Some(("curr_items".into(), "12".into()))
        );
        assert_eq!(
            parse_stat_line(b"STAT version 1.6.18"),
            Some(("version".into(), "1.6.18".into()))
        );
        assert_eq!(
            parse_stat_line(b"STAT zk_ensemble a:1,b:2"),
            Some(("zk_ensemble".into(), "a:1,b:2".into()))
        );
        assert_eq!(parse_stat_line(b"END"), None);
        assert_eq!(parse_scan_header(b"KEYS 3 1234"), Some((3, "1234".into())));
        assert_eq!(parse_scan_header(b"KEYS 0 0"), Some((0, "0".into())));
        assert_eq!(parse_scan_header(b"KEY 0 0"), None);
        assert_eq!(
            parse_scan_item(b"user:1 K 0"),
            Some(ScannedKey {
                key: "user:1".into(),
                item_type: ItemType::KeyValue,
                exptime: 0
            })
        );
        assert_eq!(
            parse_scan_item(b"b B -1"),
            Some(ScannedKey {
                key: "b".into(),
                item_type: ItemType::BTree,
                exptime: -1
            })
        );
        assert_eq!(parse_scan_item(b"k X 0"), None);
    }

    #[test]
    fn parses_metadump() {
        let e = parse_metadump_line(
            b"key=kubernetes%3Aarcus exp=1732636800 la=1732636790 cas=7 fetch=no cls=1 size=70",
        )
        .unwrap();
        assert_eq!(e.key, "kubernetes:arcus");
        assert_eq!(e.exp, Some(1732636800));
        assert_eq!(e.last_access, 1732636790);
        assert_eq!(e.cas, 7);
        assert!(!e.fetched);
        assert_eq!(e.class, 1);
        assert_eq!(e.size, 70);
        let e = parse_metadump_line(b"key=a%20b exp=-1 la=1 cas=2 fetch=yes cls=3 size=4 flags=0")
            .unwrap();
        assert_eq!(e.key, "a b");
        assert_eq!(e.exp, None);
        assert!(e.fetched);
        assert_eq!(parse_metadump_line(b"END"), None);
        assert_eq!(url_decode("%zz"), None);
        assert_eq!(url_decode("%4"), None);
        assert_eq!(url_decode("%E2%82%AC"), Some("€".into()));
    }
}
