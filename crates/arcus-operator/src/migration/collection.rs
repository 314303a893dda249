//! ARCUS collections (list, set, map, b+tree): the ascii encoding and parsing the migration
//! needs, and copying one collection between nodes.
//!
//! Formats follow naver/arcus-memcached `docs/ascii-protocol` (ch05-ch08, ch10) and the
//! server's own tests (`t/coll_*.t`), from which the unit tests' replies are taken:
//! - `getattr <key> <name>...` → `ATTR <name>=<value>` lines, `END`.
//! - `lop get <key> 0..-1`, `sop get <key> 0` → `VALUE <flags> <count>`, then per element
//!   `<bytes> <data>`; `mop get <key> 0 0` → `<field> <bytes> <data>`; `bop get <key> <range>`
//!   → `<bkey> [<eflag>] <bytes> <data>`; then `END` (or `TRIMMED` for a b+tree whose overflow
//!   trimmed the range). Data may hold any byte, so elements are cut by their length.
//! - `<lop|sop|mop|bop> create <key> <flags> <exptime> <maxcount> [<ovflaction>] [unreadable]`
//!   → `CREATED` / `EXISTS`.
//! - `lop insert <key> -1 <bytes>`, `sop insert <key> <bytes>`, `mop insert <key> <field>
//!   <bytes>`, `bop insert <key> <bkey> [<eflag>] <bytes>`, each followed by the data block →
//!   `STORED`.
//! - `setattr <key> readable=on` → `OK`.
//!
//! A copy is created `unreadable`, filled, then made readable, so a client never reads a
//! half-built collection (the server's own answer to atomic creation). Limits: an unreadable
//! source collection is not copied (`lop get` answers `UNREADABLE`, and `readable` cannot be
//! turned off again); a b+tree's `trimmed` state is not carried over; collections have no CAS,
//! so changes between pass 1 and the ring change are not propagated (see the module docs).

use super::keys::{unix_now, Expiry, TtlArg};
use arcus_client::connection::{ConnError, ConnResult, Connection, ReplyReader};
use arcus_client::{ItemType, NodePool};
use std::collections::BTreeMap;

/// Largest b+tree byte-array bkey: 31 bytes.
const MAX_BKEY_BYTES: usize = 31;

/// A collection's attributes, as `getattr` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionAttrs {
    pub flags: u32,
    /// Seconds left (0 never, -1 sticky).
    pub expiretime: i64,
    pub count: u64,
    pub maxcount: u64,
    pub overflowaction: String,
    pub readable: bool,
    /// b+tree only: `0` for unlimited.
    pub maxbkeyrange: Option<String>,
    /// b+tree only: smallest bkey (`-1` when empty); tells integer from byte-array bkeys.
    pub minbkey: Option<String>,
}

/// One element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Element {
    List(Vec<u8>),
    Set(Vec<u8>),
    Map {
        field: String,
        value: Vec<u8>,
    },
    BTree {
        bkey: String,
        eflag: Option<String>,
        value: Vec<u8>,
    },
}

impl Element {
    pub fn value(&self) -> &[u8] {
        match self {
            Element::List(v) | Element::Set(v) => v,
            Element::Map { value, .. } | Element::BTree { value, .. } => value,
        }
    }
}

/// The command prefix of a collection type.
pub fn op_prefix(t: ItemType) -> Option<&'static str> {
    Some(match t {
        ItemType::List => "lop",
        ItemType::Set => "sop",
        ItemType::Map => "mop",
        ItemType::BTree => "bop",
        ItemType::KeyValue => return None,
    })
}

/// `getattr` of the attributes a copy needs (only names valid for the type, else the server
/// answers `ATTR_ERROR not found`).
pub fn encode_getattr(key: &str, t: ItemType) -> String {
    let mut s = format!("getattr {key} flags expiretime count maxcount overflowaction readable");
    if t == ItemType::BTree {
        s.push_str(" maxbkeyrange minbkey");
    }
    s.push_str("\r\n");
    s
}

/// Parses the `ATTR name=value` lines of a `getattr` reply (without `END`).
pub fn parse_attrs(lines: &[&str]) -> Result<CollectionAttrs, String> {
    let mut m: BTreeMap<&str, &str> = BTreeMap::new();
    for l in lines {
        let Some(rest) = l.strip_prefix("ATTR ") else {
            return Err(format!("not an ATTR line: {l:?}"));
        };
        let (k, v) = rest
            .split_once('=')
            .ok_or_else(|| format!("bad ATTR line {l:?}"))?;
        m.insert(k, v);
    }
    let get = |k: &str| m.get(k).copied().ok_or_else(|| format!("no {k} attribute"));
    let num = |k: &str| -> Result<i64, String> {
        get(k)?.parse::<i64>().map_err(|_| format!("bad {k} value"))
    };
    Ok(CollectionAttrs {
        flags: num("flags")? as u32,
        expiretime: num("expiretime")?,
        count: num("count")? as u64,
        maxcount: num("maxcount")? as u64,
        overflowaction: get("overflowaction")?.to_string(),
        readable: get("readable")? == "on",
        maxbkeyrange: m.get("maxbkeyrange").map(|v| v.to_string()),
        minbkey: m.get("minbkey").map(|v| v.to_string()),
    })
}

/// The command reading every element.
pub fn encode_get_all(key: &str, t: ItemType, attrs: &CollectionAttrs) -> Option<String> {
    Some(match t {
        ItemType::List => format!("lop get {key} 0..-1\r\n"),
        ItemType::Set => format!("sop get {key} 0\r\n"),
        ItemType::Map => format!("mop get {key} 0 0\r\n"),
        ItemType::BTree => {
            let hex = attrs
                .minbkey
                .as_deref()
                .is_some_and(|b| b.starts_with("0x"));
            if hex {
                format!("bop get {key} 0x00..0x{}\r\n", "FF".repeat(MAX_BKEY_BYTES))
            } else {
                format!("bop get {key} 0..{}\r\n", u64::MAX)
            }
        }
        ItemType::KeyValue => return None,
    })
}

/// A parsed element-get reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetReply {
    pub flags: u32,
    pub elements: Vec<Element>,
    /// The closing line: `END` or `TRIMMED`.
    pub trailer: String,
}

/// Outcome of parsing a buffer that may hold only part of the reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Complete, using this many bytes.
    Done(T, usize),
    /// More bytes are needed.
    Incomplete,
}

fn line_at(buf: &[u8], pos: usize) -> Option<(&str, usize)> {
    let rel = buf[pos..].windows(2).position(|w| w == b"\r\n")?;
    let s = std::str::from_utf8(&buf[pos..pos + rel]).ok()?;
    Some((s, pos + rel + 2))
}

/// Reads up to the next space: a token of an element line.
fn token_at(buf: &[u8], pos: usize) -> Result<Option<(&str, usize)>, String> {
    let Some(rel) = buf[pos..].iter().position(|&b| b == b' ') else {
        // A token is short; a long run without a space is garbage.
        if buf.len() - pos > 512 {
            return Err("element line without a space".into());
        }
        return Ok(None);
    };
    let s = std::str::from_utf8(&buf[pos..pos + rel]).map_err(|_| "non-UTF-8 token")?;
    Ok(Some((s, pos + rel + 1)))
}

/// Parses a whole `lop/sop/mop/bop get` reply from `buf` (which may be incomplete). Replies
/// without elements (`NOT_FOUND`, `NOT_FOUND_ELEMENT`, `UNREADABLE`, errors) come back as
/// `Err(line)` so the caller can tell them apart.
pub fn parse_get_reply(buf: &[u8], t: ItemType) -> Result<Parsed<GetReply>, String> {
    let Some((head, mut pos)) = line_at(buf, 0) else {
        return Ok(Parsed::Incomplete);
    };
    let Some(rest) = head.strip_prefix("VALUE ") else {
        return Err(head.to_string());
    };
    let (flags, count) = rest
        .split_once(' ')
        .and_then(|(f, c)| Some((f.parse::<u32>().ok()?, c.parse::<usize>().ok()?)))
        .ok_or_else(|| format!("bad VALUE line {head:?}"))?;
    let mut elements = Vec::with_capacity(count);
    for _ in 0..count {
        let mut words = Vec::with_capacity(3);
        // Tokens before the data: list/set 1 (bytes), map 2 (field, bytes), b+tree 2 or 3.
        let len = loop {
            let Some((w, next)) = token_at(buf, pos)? else {
                return Ok(Parsed::Incomplete);
            };
            pos = next;
            let is_len = match t {
                ItemType::List | ItemType::Set => true,
                ItemType::Map => !words.is_empty(),
                ItemType::BTree => !words.is_empty() && !w.starts_with("0x"),
                ItemType::KeyValue => return Err("not a collection".into()),
            };
            if is_len {
                break w
                    .parse::<usize>()
                    .map_err(|_| format!("bad element length {w:?}"))?;
            }
            words.push(w.to_string());
            if words.len() > 2 {
                return Err("too many words before an element's data".into());
            }
        };
        if buf.len() < pos + len + 2 {
            return Ok(Parsed::Incomplete);
        }
        if &buf[pos + len..pos + len + 2] != b"\r\n" {
            return Err("element data not terminated by CRLF".into());
        }
        let value = buf[pos..pos + len].to_vec();
        pos += len + 2;
        let mut words = words.into_iter();
        elements.push(match t {
            ItemType::List => Element::List(value),
            ItemType::Set => Element::Set(value),
            ItemType::Map => Element::Map {
                field: words.next().unwrap_or_default(),
                value,
            },
            _ => Element::BTree {
                bkey: words.next().unwrap_or_default(),
                eflag: words.next(),
                value,
            },
        });
    }
    let Some((trailer, end)) = line_at(buf, pos) else {
        return Ok(Parsed::Incomplete);
    };
    match trailer {
        "END" | "TRIMMED" => Ok(Parsed::Done(
            GetReply {
                flags,
                elements,
                trailer: trailer.to_string(),
            },
            end,
        )),
        other => Err(format!("unexpected end of an element list {other:?}")),
    }
}

/// `<op> create <key> <flags> <exptime> <maxcount> <ovflaction> unreadable`.
pub fn encode_create(
    key: &str,
    t: ItemType,
    attrs: &CollectionAttrs,
    exptime: i64,
) -> Option<String> {
    Some(format!(
        "{} create {key} {} {exptime} {} {} unreadable\r\n",
        op_prefix(t)?,
        attrs.flags,
        attrs.maxcount,
        attrs.overflowaction
    ))
}

/// The insert command of one element (header line and data block).
pub fn encode_insert(buf: &mut Vec<u8>, key: &str, e: &Element) {
    use std::io::Write;
    let v = e.value();
    let _ = match e {
        Element::List(_) => write!(buf, "lop insert {key} -1 {}\r\n", v.len()),
        Element::Set(_) => write!(buf, "sop insert {key} {}\r\n", v.len()),
        Element::Map { field, .. } => write!(buf, "mop insert {key} {field} {}\r\n", v.len()),
        Element::BTree {
            bkey, eflag: None, ..
        } => write!(buf, "bop insert {key} {bkey} {}\r\n", v.len()),
        Element::BTree {
            bkey,
            eflag: Some(f),
            ..
        } => write!(buf, "bop insert {key} {bkey} {f} {}\r\n", v.len()),
    };
    buf.extend_from_slice(v);
    buf.extend_from_slice(b"\r\n");
}

/// What happened to one collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CollectionCopy {
    Copied {
        elements: usize,
        bytes: u64,
    },
    /// The target already has the key and it was kept.
    Exists,
    /// Gone from the source.
    Gone,
    Expired,
    /// The source is unreadable: not copied.
    Unreadable,
}

/// What reading a collection on its source found.
enum Read {
    Gone,
    Unreadable,
    Found {
        attrs: CollectionAttrs,
        elements: Vec<Element>,
    },
}

/// Writes `request` and reads its reply with `read`.
async fn exchange<T>(
    c: &mut Connection,
    request: &[u8],
    read: impl AsyncFnOnce(&mut ReplyReader) -> ConnResult<T>,
) -> ConnResult<T> {
    c.request().extend_from_slice(request);
    c.exchange(read).await
}

async fn read_attrs(r: &mut ReplyReader) -> ConnResult<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        match r.read_line().await? {
            b"END" => return Ok(Some(lines)),
            b"NOT_FOUND" => return Ok(None),
            l if l.starts_with(b"ATTR ") => lines.push(String::from_utf8_lossy(l).into_owned()),
            l => return Err(ConnError::server(l)),
        }
    }
}

async fn read_elements(r: &mut ReplyReader, t: ItemType) -> ConnResult<Result<GetReply, String>> {
    let mut buf = Vec::new();
    loop {
        match parse_get_reply(&buf, t) {
            Ok(Parsed::Done(reply, _)) => return Ok(Ok(reply)),
            Ok(Parsed::Incomplete) => {}
            Err(e) if buf.starts_with(b"VALUE ") => return Err(ConnError::Protocol(e)),
            // A one-line answer: NOT_FOUND, NOT_FOUND_ELEMENT, UNREADABLE, ...
            Err(line) => return Ok(Err(line)),
        }
        let chunk = r.read_some().await?;
        buf.extend_from_slice(&chunk);
    }
}

/// Reads the attributes and every element of `key` (a collection of type `t`).
async fn read_collection(c: &mut Connection, key: &str, t: ItemType) -> ConnResult<Read> {
    let getattr = encode_getattr(key, t);
    let Some(lines) = exchange(c, getattr.as_bytes(), async |r| read_attrs(r).await).await? else {
        return Ok(Read::Gone);
    };
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let attrs = parse_attrs(&refs).map_err(ConnError::Protocol)?;
    if !attrs.readable {
        return Ok(Read::Unreadable);
    }
    let get = encode_get_all(key, t, &attrs).expect("a collection type");
    let elements = match exchange(c, get.as_bytes(), async |r| read_elements(r, t).await).await? {
        Ok(reply) => reply.elements,
        Err(l) if l == "NOT_FOUND_ELEMENT" => Vec::new(),
        Err(l) if l == "NOT_FOUND" => return Ok(Read::Gone),
        Err(l) if l == "UNREADABLE" => return Ok(Read::Unreadable),
        Err(l) => return Err(ConnError::Server(l)),
    };
    Ok(Read::Found { attrs, elements })
}

/// Fails unless the server answered `want`.
fn expect(line: String, want: &str) -> ConnResult<()> {
    if line == want {
        Ok(())
    } else {
        Err(ConnError::Server(line))
    }
}

/// Creates the (unreadable) copy; `false` when the target has the key and it is kept.
async fn create(c: &mut Connection, create: &str, key: &str, replace: bool) -> ConnResult<bool> {
    let mut created = c.request_line(&[create]).await?;
    if created == "EXISTS" {
        if !replace {
            return Ok(false);
        }
        c.request_line(&["delete", key]).await?;
        created = c.request_line(&[create]).await?;
    }
    expect(created, "CREATED")?;
    Ok(true)
}

/// Inserts every element (pipelined), then sets the attributes `create` cannot and makes the
/// copy readable.
async fn fill(
    c: &mut Connection,
    key: &str,
    attrs: &CollectionAttrs,
    elements: &[Element],
) -> ConnResult<()> {
    let mut inserts = Vec::new();
    for e in elements {
        encode_insert(&mut inserts, key, e);
    }
    let replies = exchange(c, &inserts, async |r| {
        let mut out = Vec::with_capacity(elements.len());
        for _ in elements {
            out.push(String::from_utf8_lossy(r.read_line().await?).into_owned());
        }
        Ok(out)
    })
    .await?;
    if let Some(bad) = replies
        .into_iter()
        .find(|l| l != "STORED" && l != "ELEMENT_EXISTS")
    {
        return Err(ConnError::Server(bad));
    }
    if let Some(r) = attrs.maxbkeyrange.as_ref().filter(|v| *v != "0") {
        let set = format!("maxbkeyrange={r}");
        expect(c.request_line(&["setattr", key, &set]).await?, "OK")?;
    }
    expect(
        c.request_line(&["setattr", key, "readable=on"]).await?,
        "OK",
    )
}

/// Copies `key` (a collection of type `t`) from `src` to `tgt`. With `replace`, an item already
/// on the target is deleted first (pass 1: the target does not own the key yet, so it is a
/// leftover); otherwise it is kept.
pub(crate) async fn copy(
    src: &NodePool,
    tgt: &NodePool,
    key: &str,
    t: ItemType,
    replace: bool,
) -> arcus_client::Result<CollectionCopy> {
    let read = src
        .run("collection read", async |c| {
            read_collection(c, key, t).await
        })
        .await?;
    let (attrs, elements) = match read {
        Read::Gone => return Ok(CollectionCopy::Gone),
        Read::Unreadable => return Ok(CollectionCopy::Unreadable),
        Read::Found { attrs, elements } => (attrs, elements),
    };
    let now = unix_now();
    let exptime = match Expiry::from_attr(attrs.expiretime, now).map(|e| e.exptime_at(now)) {
        Some(TtlArg::Exptime(e)) => e,
        _ => return Ok(CollectionCopy::Expired),
    };
    let create_line = encode_create(key, t, &attrs, exptime).expect("a collection type");
    tgt.run("collection write", async |c| {
        if !create(c, create_line.trim_end(), key, replace).await? {
            return Ok(CollectionCopy::Exists);
        }
        fill(c, key, &attrs, &elements).await?;
        Ok(CollectionCopy::Copied {
            elements: elements.len(),
            bytes: elements.iter().map(|e| e.value().len() as u64).sum(),
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8], t: ItemType) -> GetReply {
        match parse_get_reply(buf, t).unwrap() {
            Parsed::Done(r, used) => {
                assert_eq!(used, buf.len());
                r
            }
            Parsed::Incomplete => panic!("incomplete"),
        }
    }

    /// Every strict prefix of a reply is incomplete, never an error or a wrong answer.
    fn prefixes_are_incomplete(buf: &[u8], t: ItemType) {
        for i in 0..buf.len() {
            assert_eq!(
                parse_get_reply(&buf[..i], t),
                Ok(Parsed::Incomplete),
                "prefix of {i} bytes"
            );
        }
    }

    // Replies recorded from arcus-memcached's t/coll_lop_*.t (lines end with CRLF on the wire).
    const LOP_GET: &[u8] =
        b"VALUE 17 5\r\n6 datum1\r\n6 datum2\r\n6 datum3\r\n6 datum4\r\n6 datum5\r\nEND\r\n";

    #[test]
    fn list_reply() {
        let r = done(LOP_GET, ItemType::List);
        assert_eq!(r.flags, 17);
        assert_eq!(r.trailer, "END");
        assert_eq!(
            r.elements,
            (1..=5)
                .map(|i| Element::List(format!("datum{i}").into_bytes()))
                .collect::<Vec<_>>()
        );
        prefixes_are_incomplete(LOP_GET, ItemType::List);
    }

    #[test]
    fn set_reply_with_binary_data() {
        // sop get: `<bytes> <data>` per element; data may hold spaces and CRLF.
        let buf = b"VALUE 0 2\r\n6 datum1\r\n5 a b\r\n\r\nEND\r\n";
        let r = done(buf, ItemType::Set);
        assert_eq!(
            r.elements,
            vec![
                Element::Set(b"datum1".to_vec()),
                Element::Set(b"a b\r\n".to_vec())
            ]
        );
        prefixes_are_incomplete(buf, ItemType::Set);
    }

    #[test]
    fn map_reply() {
        // ch07: `<field> <bytes> <data>`.
        let buf = b"VALUE 10 2\r\nf1 6 datum1\r\nfield2 0 \r\nEND\r\n";
        let r = done(buf, ItemType::Map);
        assert_eq!(r.flags, 10);
        assert_eq!(
            r.elements,
            vec![
                Element::Map {
                    field: "f1".into(),
                    value: b"datum1".to_vec()
                },
                Element::Map {
                    field: "field2".into(),
                    value: vec![]
                }
            ]
        );
        prefixes_are_incomplete(buf, ItemType::Map);
    }

    #[test]
    fn btree_replies() {
        // t/coll_bop_*.t: integer bkeys, a trimmed tree.
        let buf = b"VALUE 12 5\r\n30 7 datum03\r\n50 7 datum05\r\n70 7 datum07\r\n90 7 datum09\r\n110 7 datum11\r\nTRIMMED\r\n";
        let r = done(buf, ItemType::BTree);
        assert_eq!(r.trailer, "TRIMMED");
        assert_eq!(r.elements.len(), 5);
        assert_eq!(
            r.elements[4],
            Element::BTree {
                bkey: "110".into(),
                eflag: None,
                value: b"datum11".to_vec()
            }
        );
        // t/coll_readable_attr.t: byte-array bkeys.
        let buf = b"VALUE 11 5\r\n0x0000 6 datum1\r\n0x000F 6 datum3\r\n0x00FF 6 datum5\r\n0x0FFA 6 datum7\r\n0x0FFF 6 datum9\r\nEND\r\n";
        let r = done(buf, ItemType::BTree);
        assert_eq!(
            r.elements[0],
            Element::BTree {
                bkey: "0x0000".into(),
                eflag: None,
                value: b"datum1".to_vec()
            }
        );
        // With eflags (ch08: `<bkey> [<eflag>] <bytes> <data>`), as inserted by
        // t/coll_bop_*eflag*.t (`bop insert bkey1 0x0090 0x11FF 6`).
        let buf = b"VALUE 11 2\r\n0x0010 6 datum1\r\n0x0090 0x11FF 6 datum9\r\nEND\r\n";
        let r = done(buf, ItemType::BTree);
        assert_eq!(
            r.elements,
            vec![
                Element::BTree {
                    bkey: "0x0010".into(),
                    eflag: None,
                    value: b"datum1".to_vec()
                },
                Element::BTree {
                    bkey: "0x0090".into(),
                    eflag: Some("0x11FF".into()),
                    value: b"datum9".to_vec()
                }
            ]
        );
        prefixes_are_incomplete(buf, ItemType::BTree);
    }

    #[test]
    fn one_line_answers_are_errors() {
        for l in [
            "NOT_FOUND",
            "NOT_FOUND_ELEMENT",
            "UNREADABLE",
            "TYPE_MISMATCH",
        ] {
            let buf = format!("{l}\r\n");
            assert_eq!(
                parse_get_reply(buf.as_bytes(), ItemType::List),
                Err(l.to_string())
            );
        }
        assert!(parse_get_reply(b"VALUE 1 1\r\n3 abcX\r\nEND\r\n", ItemType::List).is_err());
    }

    #[test]
    fn attrs() {
        // getattr replies as in t/coll_*.t (`ATTR count=1`, `ATTR maxcount=1000`,
        // `ATTR overflowaction=tail_trim`, `ATTR readable=on`, `ATTR minbkey=-1`, ...).
        let lines = [
            "ATTR flags=17",
            "ATTR expiretime=999",
            "ATTR count=1",
            "ATTR maxcount=1000",
            "ATTR overflowaction=tail_trim",
            "ATTR readable=on",
        ];
        let a = parse_attrs(&lines).unwrap();
        assert_eq!(
            a,
            CollectionAttrs {
                flags: 17,
                expiretime: 999,
                count: 1,
                maxcount: 1000,
                overflowaction: "tail_trim".into(),
                readable: true,
                maxbkeyrange: None,
                minbkey: None,
            }
        );
        let mut b = lines.to_vec();
        b[5] = "ATTR readable=off";
        b.push("ATTR maxbkeyrange=0");
        b.push("ATTR minbkey=0x0010");
        let a = parse_attrs(&b).unwrap();
        assert!(!a.readable);
        assert_eq!(a.minbkey.as_deref(), Some("0x0010"));
        assert!(parse_attrs(&["ATTR flags=1"]).is_err());
        assert!(parse_attrs(&["VALUE x"]).is_err());
    }

    #[test]
    fn encodings() {
        assert_eq!(
            encode_getattr("l", ItemType::List),
            "getattr l flags expiretime count maxcount overflowaction readable\r\n"
        );
        assert!(encode_getattr("b", ItemType::BTree).ends_with(" maxbkeyrange minbkey\r\n"));
        let mut a = parse_attrs(&[
            "ATTR flags=11",
            "ATTR expiretime=0",
            "ATTR count=0",
            "ATTR maxcount=4000",
            "ATTR overflowaction=smallest_trim",
            "ATTR readable=on",
        ])
        .unwrap();
        assert_eq!(
            encode_create("b", ItemType::BTree, &a, 60).unwrap(),
            "bop create b 11 60 4000 smallest_trim unreadable\r\n"
        );
        assert_eq!(
            encode_get_all("l", ItemType::List, &a).unwrap(),
            "lop get l 0..-1\r\n"
        );
        assert_eq!(
            encode_get_all("s", ItemType::Set, &a).unwrap(),
            "sop get s 0\r\n"
        );
        assert_eq!(
            encode_get_all("m", ItemType::Map, &a).unwrap(),
            "mop get m 0 0\r\n"
        );
        assert_eq!(
            encode_get_all("b", ItemType::BTree, &a).unwrap(),
            "bop get b 0..18446744073709551615\r\n"
        );
        a.minbkey = Some("0x0010".into());
        let g = encode_get_all("b", ItemType::BTree, &a).unwrap();
        assert!(g.starts_with("bop get b 0x00..0xFFFF"));
        assert_eq!(g.len(), "bop get b 0x00..0x".len() + 62 + 2);
        assert_eq!(encode_get_all("k", ItemType::KeyValue, &a), None);

        let mut buf = Vec::new();
        encode_insert(&mut buf, "l", &Element::List(b"datum1".to_vec()));
        encode_insert(&mut buf, "s", &Element::Set(b"x".to_vec()));
        encode_insert(
            &mut buf,
            "m",
            &Element::Map {
                field: "f".into(),
                value: b"v".to_vec(),
            },
        );
        encode_insert(
            &mut buf,
            "b",
            &Element::BTree {
                bkey: "0x0090".into(),
                eflag: Some("0x11FF".into()),
                value: b"datum9".to_vec(),
            },
        );
        encode_insert(
            &mut buf,
            "b",
            &Element::BTree {
                bkey: "30".into(),
                eflag: None,
                value: b"d".to_vec(),
            },
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "lop insert l -1 6\r\ndatum1\r\nsop insert s 1\r\nx\r\nmop insert m f 1\r\nv\r\n\
             bop insert b 0x0090 0x11FF 6\r\ndatum9\r\nbop insert b 30 1\r\nd\r\n"
        );
    }

    // ------------------------------------------------------------------ copy over sockets
    // No arcus-memcached binary exists on this machine (tests/real_arcus.rs runs against one
    // when ARCUS_MEMCACHED_BIN is set), so these serve arcus-memcached's replies from a
    // scripted socket and check what the copy sends, line by line.

    use arcus_client::PoolLimits;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    type Script = &'static [(&'static str, &'static str)];

    /// Answers each line it receives with its scripted reply (none for lines not in the
    /// script, e.g. an insert's header before its data line); records every line.
    async fn scripted(script: Script) -> (NodePool, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let line = line.trim_end().to_string();
                        let reply = script.iter().find(|(l, _)| *l == line).map_or("", |r| r.1);
                        log.lock().unwrap().push(line);
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let limits = PoolLimits {
            op_timeout: std::time::Duration::from_secs(5),
            ..PoolLimits::default()
        };
        (NodePool::new(addr, limits), seen)
    }

    const GETATTR: &str = "getattr l flags expiretime count maxcount overflowaction readable";
    const ATTRS: &str = "ATTR flags=17\r\nATTR expiretime=0\r\nATTR count=2\r\n\
        ATTR maxcount=4000\r\nATTR overflowaction=tail_trim\r\nATTR readable=on\r\nEND\r\n";
    /// A source holding the list `l` (flags 17, no expiry) with two elements, as t/coll_lop_*.t
    /// shows them.
    const SOURCE: Script = &[
        (GETATTR, ATTRS),
        (
            "lop get l 0..-1",
            "VALUE 17 2\r\n6 datum1\r\n6 datum2\r\nEND\r\n",
        ),
    ];

    #[tokio::test]
    async fn a_list_is_created_unreadable_filled_then_made_readable() {
        let (src, _) = scripted(SOURCE).await;
        let (tgt, seen) = scripted(&[
            ("lop create l 17 0 4000 tail_trim unreadable", "CREATED\r\n"),
            ("datum1", "STORED\r\n"),
            ("datum2", "STORED\r\n"),
            ("setattr l readable=on", "OK\r\n"),
        ])
        .await;
        let outcome = copy(&src, &tgt, "l", ItemType::List, true).await.unwrap();
        assert_eq!(
            outcome,
            CollectionCopy::Copied {
                elements: 2,
                bytes: 12
            }
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "lop create l 17 0 4000 tail_trim unreadable",
                "lop insert l -1 6",
                "datum1",
                "lop insert l -1 6",
                "datum2",
                "setattr l readable=on",
            ]
        );
    }

    #[tokio::test]
    async fn an_existing_target_item_is_kept_or_replaced() {
        let (src, _) = scripted(SOURCE).await;
        let create = "lop create l 17 0 4000 tail_trim unreadable";
        let (tgt, seen) = scripted(&[
            ("lop create l 17 0 4000 tail_trim unreadable", "EXISTS\r\n"),
            ("delete l", "DELETED\r\n"),
        ])
        .await;
        let kept = copy(&src, &tgt, "l", ItemType::List, false).await.unwrap();
        assert_eq!(kept, CollectionCopy::Exists);
        assert_eq!(*seen.lock().unwrap(), [create]);
        // With `replace` the leftover is deleted and created again; a second EXISTS fails,
        // naming the target.
        let err = copy(&src, &tgt, "l", ItemType::List, true)
            .await
            .unwrap_err();
        assert_eq!(seen.lock().unwrap()[1..], [create, "delete l", create]);
        assert_eq!(err.node(), Some(tgt.addr()), "{err}");
        assert!(err.to_string().contains("EXISTS"), "{err}");
    }

    #[tokio::test]
    async fn missing_unreadable_and_odd_sources() {
        let (tgt, seen) = scripted(&[]).await;
        let (gone, _) = scripted(&[(GETATTR, "NOT_FOUND\r\n")]).await;
        let outcome = copy(&gone, &tgt, "l", ItemType::List, true).await.unwrap();
        assert_eq!(outcome, CollectionCopy::Gone);
        let (locked, _) =
            scripted(&[(GETATTR, ATTRS), ("lop get l 0..-1", "UNREADABLE\r\n")]).await;
        let outcome = copy(&locked, &tgt, "l", ItemType::List, true)
            .await
            .unwrap();
        assert_eq!(outcome, CollectionCopy::Unreadable);
        let (odd, _) =
            scripted(&[(GETATTR, ATTRS), ("lop get l 0..-1", "TYPE_MISMATCH\r\n")]).await;
        let err = copy(&odd, &tgt, "l", ItemType::List, true)
            .await
            .unwrap_err();
        assert_eq!(err.node(), Some(odd.addr()), "{err}");
        assert!(err.to_string().contains("TYPE_MISMATCH"), "{err}");
        assert!(
            seen.lock().unwrap().is_empty(),
            "nothing written to the target"
        );
    }
}
