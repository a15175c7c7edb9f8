mod common;
use common::*;

// Robustness and conformance of the NBD server, byte by byte. A small blocking client speaks
// the protocol over the server's unix socket and checks each reply against the NBD spec
// (doc/proto.md of the NBD project); abusive clients must never take the server, or its other
// connections, down; shutdown must answer what it read and flush; TLS works with real clients.
//
// No sleeps: every socket has a 10 s read/write timeout, so a hang fails a test instead of
// blocking it forever.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command as Cmd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_nbd::proto::{self, Command, Request};
use cairn_nbd::{Export, ExportError, ExportListing, Exports, LookupError, ServerConfig, TlsMode, VolumeExports};
use cairn_volume::{AllocExtent, Allocation, DepthExtent, Store, StoreOptions, VolumeId};

const TIMEOUT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// Every transmission flag the server sets for a writable volume without structured replies;
// a snapshot drops trim and the zero flags and adds READ_ONLY; structured replies add DF.
const RW_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_FUA
    | proto::FLAG_SEND_CACHE
    | proto::FLAG_CAN_MULTI_CONN
    | proto::FLAG_SEND_TRIM
    | proto::FLAG_SEND_WRITE_ZEROES
    | proto::FLAG_SEND_FAST_ZERO;
const RO_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_READ_ONLY
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_FUA
    | proto::FLAG_SEND_CACHE
    | proto::FLAG_CAN_MULTI_CONN;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

// ---------------------------------------------------------------------------------------------
// A raw NBD client.

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A string field: 32-bit length, then the bytes.
fn string_field(s: &str) -> Vec<u8> {
    let mut d = (s.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(s.as_bytes());
    d
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = string_field(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT payload.
fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = string_field(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend(string_field(q));
    }
    d
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

impl OptReply {
    fn is_final(&self) -> bool {
        self.kind == proto::REP_ACK || self.kind & (1 << 31) != 0
    }
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Chunk {
    fn done(&self) -> bool {
        self.flags & proto::REPLY_FLAG_DONE != 0
    }
}

/// A transmission-phase reply of either kind (a simple read reply's data is read separately).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple { cookie: u64, error: u32 },
    Chunk(Chunk),
}

/// What a session negotiated before entering transmission.
#[derive(Debug, Clone, Copy, Default)]
struct Neg {
    structured: bool,
    meta: bool,
}

struct Raw {
    s: UnixStream,
    /// Export size and transmission flags, once in transmission.
    size: u64,
    flags: u16,
    /// The id base:allocation got from SET_META_CONTEXT.
    context: Option<u32>,
    next_cookie: u64,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect to the server");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Raw { s, size: 0, flags: 0, context: None, next_cookie: 1 }
    }

    /// Connects and reads the greeting, checking every byte.
    fn greeted(server: &TestServer) -> Raw {
        let mut c = Raw::connect(&server.socket);
        let g = c.read_n(proto::GREETING_LEN);
        assert_eq!(g, b"NBDMAGICIHAVEOPT\x00\x03", "greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES");
        assert_eq!(g, proto::greeting());
        c
    }

    /// Greeting, then the client flags.
    fn with_flags(server: &TestServer, flags: u32) -> Raw {
        let mut c = Raw::greeted(server);
        c.send(&flags.to_be_bytes());
        c
    }

    /// A fixed-newstyle, no-zeroes client in option haggling.
    fn haggling(server: &TestServer) -> Raw {
        Raw::with_flags(server, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
    }

    /// A session in transmission on `export`, with what `neg` asks for.
    fn session(server: &TestServer, export: &str, neg: Neg) -> Raw {
        let mut c = Raw::haggling(server);
        if neg.structured {
            c.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.opt_final(), [ack(proto::OPT_STRUCTURED_REPLY)]);
        }
        if neg.meta {
            c.option(proto::OPT_SET_META_CONTEXT, &meta_data(export, &[proto::BASE_ALLOCATION]));
            let r = c.opt_final();
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].kind, proto::REP_META_CONTEXT);
            assert_eq!(&r[0].data[4..], proto::BASE_ALLOCATION.as_bytes());
            c.context = Some(be32(&r[0].data));
        }
        c.option(proto::OPT_GO, &go_data(export, &[]));
        let r = c.opt_final();
        assert_eq!(r.last().map(|r| r.kind), Some(proto::REP_ACK), "GO {export}: {r:?}");
        let info = r.iter().find(|r| r.kind == proto::REP_INFO && be16(&r.data) == proto::INFO_EXPORT).unwrap();
        c.size = be64(&info.data[2..]);
        c.flags = be16(&info.data[10..]);
        c
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        if let Err(e) = self.s.read_exact(&mut buf) {
            panic!("reading {n} bytes from the server: {e}");
        }
        buf
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the server");
    }

    /// Sends what the server may already have stopped reading.
    fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn option_header(option: u32, len: u32) -> Vec<u8> {
        let mut d = proto::OPTION_MAGIC.to_be_bytes().to_vec();
        d.extend_from_slice(&option.to_be_bytes());
        d.extend_from_slice(&len.to_be_bytes());
        d
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut d = Raw::option_header(option, data.len() as u32);
        d.extend_from_slice(data);
        self.send(&d);
    }

    fn opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h), proto::OPTION_REPLY_MAGIC, "option reply magic in {h:02x?}");
        let len = be32(&h[16..]) as usize;
        OptReply { option: be32(&h[8..]), kind: be32(&h[12..]), data: self.read_n(len) }
    }

    /// Option replies up to and including the final one (an ACK or an error).
    fn opt_final(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.is_final();
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Asserts the server closes the connection without sending anything more.
    fn assert_closed(&mut self, what: &str) {
        let mut buf = [0u8; 4096];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: expected the server to close, got {n} bytes: {:02x?}", &buf[..n.min(64)]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
            Err(e) => panic!("{what}: expected the server to close the connection, got: {e}"),
        }
    }

    /// Reads whatever the server still sends until it closes; fails on a hang.
    fn drain_to_close(&mut self, what: &str) -> usize {
        let mut total = 0;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return total,
                Err(e) => panic!("{what}: the server neither replied nor closed: {e}"),
            }
        }
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        0x5eed_0000_0000_0000 | self.next_cookie
    }

    fn request(&mut self, flags: u16, command: Command, cookie: u64, offset: u64, length: u32) {
        self.send(&proto::encode_request(&Request { flags, command, cookie, offset, length }));
    }

    fn simple(&mut self) -> (u64, u32) {
        let h = self.read_n(proto::SIMPLE_REPLY_LEN);
        assert_eq!(be32(&h), proto::SIMPLE_REPLY_MAGIC, "simple reply magic in {h:02x?}");
        (be64(&h[8..]), be32(&h[4..]))
    }

    fn reply(&mut self) -> Reply {
        let m = self.read_n(4);
        match be32(&m) {
            proto::SIMPLE_REPLY_MAGIC => {
                let h = self.read_n(12);
                Reply::Simple { error: be32(&h), cookie: be64(&h[4..]) }
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let h = self.read_n(16);
                let len = be32(&h[12..]) as usize;
                Reply::Chunk(Chunk {
                    flags: be16(&h),
                    kind: be16(&h[2..]),
                    cookie: be64(&h[4..]),
                    payload: self.read_n(len),
                })
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Chunks of one structured reply, up to the one flagged DONE.
    fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            match self.reply() {
                Reply::Chunk(c) => {
                    assert_eq!(c.cookie, cookie);
                    let done = c.done();
                    out.push(c);
                    if done {
                        return out;
                    }
                }
                Reply::Simple { cookie: k, error } => {
                    panic!("simple reply (cookie {k:#x}, error {error}) where a structured one was due")
                }
            }
        }
    }

    /// A simple reply's error for a request without reply data.
    fn expect_simple(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { cookie: k, error } => {
                assert_eq!(k, cookie);
                error
            }
            Reply::Chunk(c) => {
                // Also acceptable per spec; treat a lone NONE/ERROR chunk like a simple reply.
                assert_eq!(c.cookie, cookie);
                assert!(c.done(), "{c:?}");
                match c.kind {
                    proto::REPLY_TYPE_NONE => 0,
                    proto::REPLY_TYPE_ERROR => be32(&c.payload),
                    other => panic!("unexpected chunk type {other} for a request without data"),
                }
            }
        }
    }

    /// A write (or other data-less command) and its error value.
    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.write_flags(0, offset, data)
    }

    fn write_flags(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let cookie = self.cookie();
        let mut d = proto::encode_request(&Request {
            flags,
            command: Command::Write,
            cookie,
            offset,
            length: data.len() as u32,
        })
        .to_vec();
        d.extend_from_slice(data);
        self.send(&d);
        self.expect_simple(cookie)
    }

    fn command(&mut self, flags: u16, command: Command, offset: u64, length: u32) -> u32 {
        let cookie = self.cookie();
        self.request(flags, command, cookie, offset, length);
        self.expect_simple(cookie)
    }

    /// A read in a session without structured replies.
    fn read_simple(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let cookie = self.cookie();
        self.request(0, Command::Read, cookie, offset, len);
        let (k, error) = self.simple();
        assert_eq!(k, cookie);
        if error != 0 {
            return Err(error);
        }
        Ok(self.read_n(len as usize))
    }

    /// A structured read: its chunks, checked for the spec's layout rules, and the bytes they
    /// describe (or the error value of an error chunk).
    fn read_structured(&mut self, flags: u16, offset: u64, len: u32) -> (Vec<Chunk>, Result<Vec<u8>, u32>) {
        let cookie = self.cookie();
        self.request(flags, Command::Read, cookie, offset, len);
        let chunks = self.chunks(cookie);
        let data = assemble_read(&chunks, offset, len);
        (chunks, data)
    }

    /// Any read, in either kind of session; panics on an error.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        if self.flags & proto::FLAG_SEND_DF != 0 {
            self.read_structured(0, offset, len).1.expect("read")
        } else {
            self.read_simple(offset, len).expect("read")
        }
    }

    /// BLOCK_STATUS: the (length, flags) descriptors, or the error value.
    fn block_status(&mut self, flags: u16, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, u32> {
        let cookie = self.cookie();
        self.request(flags, Command::BlockStatus, cookie, offset, len);
        let chunks = self.chunks(cookie);
        assert_eq!(chunks.len(), 1, "exactly one chunk for one context: {chunks:?}");
        let c = &chunks[0];
        match c.kind {
            proto::REPLY_TYPE_ERROR => Err(check_error_chunk(c)),
            proto::REPLY_TYPE_BLOCK_STATUS => {
                assert!(c.payload.len() >= 12 && (c.payload.len() - 4).is_multiple_of(8), "{c:?}");
                assert_eq!(Some(be32(&c.payload)), self.context, "context id");
                let d: Vec<(u32, u32)> = c.payload[4..].chunks(8).map(|d| (be32(d), be32(&d[4..]))).collect::<Vec<_>>();
                assert!(d.iter().all(|(l, _)| *l > 0), "descriptor lengths must be nonzero: {d:?}");
                Ok(d)
            }
            other => panic!("unexpected chunk type {other} for BLOCK_STATUS"),
        }
    }

    fn disconnect(&mut self) {
        let cookie = self.cookie();
        self.request(0, Command::Disconnect, cookie, 0, 0);
    }
}

fn ack(option: u32) -> OptReply {
    OptReply { option, kind: proto::REP_ACK, data: Vec::new() }
}

/// Checks an ERROR chunk's layout and returns its error value.
fn check_error_chunk(c: &Chunk) -> u32 {
    assert_eq!(c.kind, proto::REPLY_TYPE_ERROR);
    assert!(c.done(), "the error chunk ends the reply: {c:?}");
    assert!(c.payload.len() >= 6, "{c:?}");
    let error = be32(&c.payload);
    let msg_len = be16(&c.payload[4..]) as usize;
    assert_eq!(c.payload.len(), 6 + msg_len, "message length matches the chunk length");
    assert!(std::str::from_utf8(&c.payload[6..]).is_ok());
    assert_ne!(error, 0);
    error
}

/// Rebuilds a structured read from its chunks, checking that content chunks lie within the
/// request, do not overlap, cover it exactly, and that only the last chunk says DONE.
fn assemble_read(chunks: &[Chunk], offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.done(), i == last, "only the last chunk has DONE: {:?}", (i, c.flags, c.kind));
    }
    if chunks[last].kind == proto::REPLY_TYPE_ERROR {
        return Err(check_error_chunk(&chunks[last]));
    }
    let mut out = vec![0u8; len as usize];
    let mut covered = vec![false; len as usize];
    for c in chunks {
        let (start, n) = match c.kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                assert!(c.payload.len() >= 9, "OFFSET_DATA needs at least one byte");
                (be64(&c.payload), c.payload.len() as u64 - 8)
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12);
                let n = be32(&c.payload[8..]);
                assert_ne!(n, 0, "hole size must be nonzero");
                (be64(&c.payload), u64::from(n))
            }
            proto::REPLY_TYPE_NONE => {
                assert!(c.payload.is_empty());
                assert!(c.done());
                continue;
            }
            other => panic!("unexpected chunk type {other} in a read"),
        };
        assert!(start >= offset && start + n <= offset + u64::from(len), "chunk {start}+{n} outside the read");
        let at = (start - offset) as usize;
        for (i, seen) in covered[at..at + n as usize].iter_mut().enumerate() {
            assert!(!*seen, "chunks overlap at {}", start + i as u64);
            *seen = true;
        }
        if c.kind == proto::REPLY_TYPE_OFFSET_DATA {
            out[at..at + n as usize].copy_from_slice(&c.payload[8..]);
        }
    }
    assert!(covered.iter().all(|c| *c), "the chunks do not cover the whole read");
    Ok(out)
}

/// A chunk's (type, offset, length) for comparing layouts.
fn layout(chunks: &[Chunk]) -> Vec<(u16, u64, u64)> {
    chunks
        .iter()
        .map(|c| match c.kind {
            proto::REPLY_TYPE_OFFSET_DATA => (c.kind, be64(&c.payload), c.payload.len() as u64 - 8),
            proto::REPLY_TYPE_OFFSET_HOLE => (c.kind, be64(&c.payload), u64::from(be32(&c.payload[8..]))),
            k => (k, 0, 0),
        })
        .collect()
}

fn volume(store: &Store, name: &str, size: u64) -> VolumeId {
    store.create_volume(name, size).expect("create volume").id
}

fn store_read(store: &Store, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let v = store.volume(store.volume_id(name).unwrap()).unwrap();
    let mut buf = vec![0u8; len];
    v.read(&mut buf, offset).unwrap();
    buf
}

/// A second, long-lived connection: must keep working while others misbehave.
fn check_alive(c: &mut Raw, round: u64) {
    let data = pattern(4096 + 17, 0xa11e ^ round);
    assert_eq!(c.write(8192 + round % 512, &data), 0, "the other connection still writes");
    assert_eq!(c.read(8192 + round % 512, data.len() as u32), data, "the other connection still reads");
}

/// A brand-new connection works end to end.
fn check_fresh(server: &TestServer, export: &str, round: u64) {
    let mut c = Raw::session(server, export, Neg::default());
    check_alive(&mut c, round);
    c.disconnect();
    c.assert_closed("NBD_CMD_DISC");
}

// ---------------------------------------------------------------------------------------------
// 1. Handshake.

#[test]
fn handshake_greeting_and_client_flags() {
    let server = TestServer::start();
    volume(&server.store, "disk", 4 * MIB);

    // Greeting bytes are checked in greeted(); a client without FIXED_NEWSTYLE is refused.
    let mut c = Raw::with_flags(&server, 0);
    c.assert_closed("client flags 0 (no FIXED_NEWSTYLE)");
    let mut c = Raw::with_flags(&server, proto::FLAG_C_NO_ZEROES);
    c.assert_closed("client flags NO_ZEROES only");
    // Unknown bits end the session, whatever else is set.
    for flags in [1 | 4, 3 | 8, 1 | 1 << 31, u32::MAX] {
        let mut c = Raw::with_flags(&server, flags);
        c.assert_closed(&format!("client flags {flags:#x}"));
    }
    // A client that sends only part of its flags and leaves.
    let mut c = Raw::greeted(&server);
    c.send(&[0, 0]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    c.assert_closed("half the client flags");

    // NBD_OPT_EXPORT_NAME with NO_ZEROES: 8 bytes size + 2 bytes flags, nothing more.
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_EXPORT_NAME, b"disk");
    let r = c.read_n(10);
    assert_eq!(be64(&r), 4 * MIB);
    assert_eq!(be16(&r[8..]), RW_FLAGS);
    // The next bytes are the reply to our first request: no 124 zeros came in between.
    c.flags = RW_FLAGS;
    assert_eq!(c.read_simple(0, 512), Ok(vec![0u8; 512]));

    // Without NO_ZEROES: 134 bytes, the last 124 of them zero.
    let mut c = Raw::with_flags(&server, proto::FLAG_C_FIXED_NEWSTYLE);
    c.option(proto::OPT_EXPORT_NAME, b"disk");
    let r = c.read_n(134);
    assert_eq!(be64(&r), 4 * MIB);
    assert_eq!(be16(&r[8..]), RW_FLAGS);
    assert!(r[10..].iter().all(|b| *b == 0));
    assert_eq!(c.read_simple(4096, 512), Ok(vec![0u8; 512]));

    // EXPORT_NAME of an export that does not exist: it cannot error, so the session ends.
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_EXPORT_NAME, b"nope");
    c.assert_closed("EXPORT_NAME of an unknown export");
    // Nor can a malformed one (not UTF-8).
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_EXPORT_NAME, &[0xff, 0xfe]);
    c.assert_closed("EXPORT_NAME that is not UTF-8");
}

// ---------------------------------------------------------------------------------------------
// 2. Option haggling errors.

#[test]
fn option_errors_keep_the_session_open() {
    let server = TestServer::start();
    let id = volume(&server.store, "disk", 4 * MIB);
    server.store.snapshot(id, "s1").unwrap();
    let mut c = Raw::haggling(&server);

    let list = |c: &mut Raw| {
        c.option(proto::OPT_LIST, &[]);
        let r = c.opt_final();
        assert_eq!(r.last(), Some(&ack(proto::OPT_LIST)));
        let mut names = Vec::new();
        for s in &r[..r.len() - 1] {
            assert_eq!((s.option, s.kind), (proto::OPT_LIST, proto::REP_SERVER));
            let n = be32(&s.data) as usize;
            assert!(4 + n <= s.data.len());
            names.push(String::from_utf8(s.data[4..4 + n].to_vec()).unwrap());
        }
        names
    };
    assert_eq!(list(&mut c), ["disk", "disk@s1"]);

    // An unknown option: NBD_REP_ERR_UNSUP, echoing the option, and haggling goes on.
    c.option(42, b"whatever");
    let r = c.opt_final();
    assert_eq!((r.len(), r[0].option, r[0].kind), (1, 42, proto::REP_ERR_UNSUP));
    assert_eq!(list(&mut c), ["disk", "disk@s1"]);

    // NBD_OPT_GO whose name length runs past the payload: NBD_REP_ERR_INVALID.
    let mut truncated = 10u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(b"dis");
    c.option(proto::OPT_GO, &truncated);
    let r = c.opt_final();
    assert_eq!((r.len(), r[0].option, r[0].kind), (1, proto::OPT_GO, proto::REP_ERR_INVALID));
    // ... and one missing its info-request count, and one with a byte too many.
    c.option(proto::OPT_GO, &string_field("disk"));
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    let mut trailing = go_data("disk", &[]);
    trailing.push(0);
    c.option(proto::OPT_GO, &trailing);
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    // A meta-context query count that lies.
    let mut lying = string_field("disk");
    lying.extend_from_slice(&1000u32.to_be_bytes());
    c.option(proto::OPT_LIST_META_CONTEXT, &lying);
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    // Options that take no data reject data (the spec's SHOULD).
    c.option(proto::OPT_LIST, b"x");
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    c.option(proto::OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    // STARTTLS on a server without TLS: NOTLS mode answers ERR_UNSUP (or POLICY).
    c.option(proto::OPT_STARTTLS, &[]);
    let r = c.opt_final();
    assert!(matches!(r[0].kind, proto::REP_ERR_UNSUP | proto::REP_ERR_POLICY), "{r:?}");
    assert_eq!(list(&mut c), ["disk", "disk@s1"]);

    // An option of exactly 64 KiB is read; one byte more is skipped with ERR_TOO_BIG.
    c.option(43, &vec![7u8; proto::MAX_OPTION_LEN as usize]);
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_UNSUP);
    for option in [43, proto::OPT_GO, proto::OPT_SET_META_CONTEXT] {
        c.option(option, &vec![7u8; proto::MAX_OPTION_LEN as usize + 1]);
        let r = c.opt_final();
        assert_eq!((r.len(), r[0].option, r[0].kind), (1, option, proto::REP_ERR_TOO_BIG));
    }
    c.option(44, &vec![1u8; 1 << 20]);
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_TOO_BIG);
    assert_eq!(list(&mut c), ["disk", "disk@s1"]);

    // After all that, GO still works on this connection.
    c.option(proto::OPT_GO, &go_data("disk", &[]));
    assert_eq!(c.opt_final().last().unwrap().kind, proto::REP_ACK);
    c.flags = RW_FLAGS;
    assert_eq!(c.read_simple(0, 16), Ok(vec![0; 16]));

    // A bad option magic: the stream is out of step, the server closes.
    let mut c = Raw::haggling(&server);
    let mut bad = Raw::option_header(proto::OPT_LIST, 0);
    bad[0] ^= 0x80;
    c.send(&bad);
    c.assert_closed("bad option magic");

    // An EXPORT_NAME too long to read cannot be answered: closed.
    let mut c = Raw::haggling(&server);
    let mut big = Raw::option_header(proto::OPT_EXPORT_NAME, proto::MAX_OPTION_LEN + 1);
    big.extend_from_slice(&vec![b'a'; proto::MAX_OPTION_LEN as usize + 1]);
    c.send_lossy(&big);
    c.assert_closed("EXPORT_NAME longer than 64 KiB");

    // NBD_OPT_ABORT: an ACK, then the server closes. Data with it is ignored.
    for data in [&b""[..], b"ignored"] {
        let mut c = Raw::haggling(&server);
        c.option(proto::OPT_ABORT, data);
        assert_eq!(c.opt_reply(), ack(proto::OPT_ABORT));
        c.assert_closed("after NBD_OPT_ABORT");
    }
    // A too-big option whose data never comes: the server must not wait past the client's EOF.
    let mut c = Raw::haggling(&server);
    c.send(&Raw::option_header(45, u32::MAX));
    c.send(&[0u8; 1000]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    c.assert_closed("oversized option cut short");
}

// ---------------------------------------------------------------------------------------------
// 3. NBD_OPT_INFO / NBD_OPT_GO.

#[test]
fn info_and_go_replies() {
    let server = TestServer::start();
    let id = volume(&server.store, "disk", 3 * MIB + 512);
    server.store.snapshot(id, "s1").unwrap();
    let mut c = Raw::haggling(&server);

    for name in ["nope", "disk@nope", "nope@s1", ""] {
        for option in [proto::OPT_INFO, proto::OPT_GO] {
            c.option(option, &go_data(name, &[proto::INFO_BLOCK_SIZE]));
            let r = c.opt_final();
            assert_eq!(r.len(), 1, "no NBD_REP_INFO before ERR_UNKNOWN: {r:?}");
            assert_eq!((r[0].option, r[0].kind), (option, proto::REP_ERR_UNKNOWN), "{name:?}");
        }
    }

    let block_size = OptReply { option: 0, kind: proto::REP_INFO, data: proto::info_block_size(1, 4096, 32 << 20) };
    let expect = |option: u32, size: u64, flags: u16, name: Option<&str>| {
        let mut v = vec![OptReply { option, kind: proto::REP_INFO, data: proto::info_export(size, flags) }];
        if let Some(n) = name {
            v.push(OptReply { option, kind: proto::REP_INFO, data: proto::info_text(proto::INFO_NAME, n) });
        }
        v.push(OptReply { option, ..block_size.clone() });
        v.push(ack(option));
        v
    };
    // The exact bytes of the info replies, for sure:
    assert_eq!(proto::info_export(3 * MIB + 512, RW_FLAGS).len(), 12);
    let bs = proto::info_block_size(1, 4096, 32 << 20);
    assert_eq!(bs, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);

    // INFO does not enter transmission: options keep working after it.
    c.option(proto::OPT_INFO, &go_data("disk", &[]));
    assert_eq!(c.opt_final(), expect(proto::OPT_INFO, 3 * MIB + 512, RW_FLAGS, None));
    c.option(proto::OPT_INFO, &go_data("disk@s1", &[proto::INFO_NAME, proto::INFO_BLOCK_SIZE, 999]));
    assert_eq!(c.opt_final(), expect(proto::OPT_INFO, 3 * MIB + 512, RO_FLAGS, Some("disk@s1")));
    // Snapshots are also reachable by numeric ids.
    let snap = server.store.list_snapshots(None)[0].id.0;
    c.option(proto::OPT_INFO, &go_data(&format!("{}@{snap}", id.0), &[]));
    assert_eq!(c.opt_final(), expect(proto::OPT_INFO, 3 * MIB + 512, RO_FLAGS, None));
    c.option(proto::OPT_LIST, &[]);
    assert_eq!(c.opt_final().last(), Some(&ack(proto::OPT_LIST)));

    // GO: the same replies, then transmission.
    c.option(proto::OPT_GO, &go_data("disk", &[proto::INFO_BLOCK_SIZE]));
    assert_eq!(c.opt_final(), expect(proto::OPT_GO, 3 * MIB + 512, RW_FLAGS, None));
    c.flags = RW_FLAGS;
    assert_eq!(c.read_simple(3 * MIB, 512), Ok(vec![0; 512]), "in transmission after GO");

    // GO on the snapshot, after STRUCTURED_REPLY: READ_ONLY and DF.
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_final(), [ack(proto::OPT_STRUCTURED_REPLY)]);
    c.option(proto::OPT_GO, &go_data("disk@s1", &[]));
    assert_eq!(c.opt_final(), expect(proto::OPT_GO, 3 * MIB + 512, RO_FLAGS | proto::FLAG_SEND_DF, None));
    c.flags = RO_FLAGS | proto::FLAG_SEND_DF;
    assert_eq!(c.read(0, 4096), vec![0; 4096]);
}

// ---------------------------------------------------------------------------------------------
// 4. Structured replies and metadata contexts.

#[test]
fn meta_context_negotiation() {
    let server = TestServer::start();
    volume(&server.store, "disk", 4 * MIB);
    volume(&server.store, "other", 4 * MIB);
    let mut c = Raw::haggling(&server);

    // Before structured replies, metadata contexts are refused.
    c.option(proto::OPT_SET_META_CONTEXT, &meta_data("disk", &[proto::BASE_ALLOCATION]));
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    c.option(proto::OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    let r = c.opt_final();
    assert!(matches!(r[0].kind, proto::REP_ERR_INVALID), "LIST before structured: {r:?}");

    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_final(), [ack(proto::OPT_STRUCTURED_REPLY)]);
    // A second time is refused (MAY).
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);

    let named = |option: u32, id: u32, name: &str| OptReply {
        option,
        kind: proto::REP_META_CONTEXT,
        data: proto::rep_meta_context(id, name),
    };
    let ctx = |option: u32, id: u32| named(option, id, proto::BASE_ALLOCATION);
    // LIST with no queries lists everything (id 0, which clients disregard).
    let list = proto::OPT_LIST_META_CONTEXT;
    let depth = named(list, 0, proto::QEMU_ALLOCATION_DEPTH);
    c.option(list, &meta_data("disk", &[]));
    assert_eq!(c.opt_final(), [ctx(list, 0), depth.clone(), ack(list)]);
    // Namespaces alone are wildcards when listing.
    c.option(list, &meta_data("disk", &["base:"]));
    assert_eq!(c.opt_final(), [ctx(list, 0), ack(list)]);
    c.option(list, &meta_data("disk", &["qemu:"]));
    assert_eq!(c.opt_final(), [depth, ack(list)]);
    c.option(list, &meta_data("disk", &["qemu:dirty-bitmap:x", "base:allocation"]));
    assert_eq!(c.opt_final(), [ctx(list, 0), ack(list)]);
    // Unknown namespaces are ignored: just an ACK.
    c.option(list, &meta_data("disk", &["qemu:dirty-bitmap:x"]));
    assert_eq!(c.opt_final(), [ack(list)]);
    c.option(list, &meta_data("nope", &[]));
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_UNKNOWN);

    // SET: one context with a (nonzero here) id, then ACK.
    let set = proto::OPT_SET_META_CONTEXT;
    c.option(set, &meta_data("disk", &[proto::BASE_ALLOCATION]));
    let r = c.opt_final();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].option, r[0].kind), (set, proto::REP_META_CONTEXT));
    assert_eq!(&r[0].data[4..], b"base:allocation");
    assert_eq!(r[1], ack(set));
    let id = be32(&r[0].data);
    // "base:" selects nothing on SET; nor do zero queries.
    c.option(set, &meta_data("disk", &["base:"]));
    assert_eq!(c.opt_final(), [ack(set)]);
    c.option(set, &meta_data("disk", &[]));
    assert_eq!(c.opt_final(), [ack(set)]);
    c.option(set, &meta_data("nope", &[proto::BASE_ALLOCATION]));
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_UNKNOWN);
    // The last SET selected nothing: BLOCK_STATUS is refused in transmission.
    c.option(proto::OPT_GO, &go_data("disk", &[]));
    assert_eq!(c.opt_final().last().unwrap().kind, proto::REP_ACK);
    c.context = Some(id);
    assert_eq!(c.block_status(0, 0, 4096), Err(EINVAL));

    // A context set for one export does not apply to another.
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    c.opt_final();
    c.option(set, &meta_data("disk", &[proto::BASE_ALLOCATION]));
    let id = be32(&c.opt_final()[0].data);
    c.option(proto::OPT_GO, &go_data("other", &[]));
    assert_eq!(c.opt_final().last().unwrap().kind, proto::REP_ACK);
    c.context = Some(id);
    assert_eq!(c.block_status(0, 0, 4096), Err(EINVAL));

    // A SET that fails as malformed also clears the selection.
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    c.opt_final();
    c.option(set, &meta_data("disk", &[proto::BASE_ALLOCATION]));
    let id = be32(&c.opt_final()[0].data);
    c.option(set, &[0, 0, 0, 9, b'd']);
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID);
    c.option(proto::OPT_GO, &go_data("disk", &[]));
    assert_eq!(c.opt_final().last().unwrap().kind, proto::REP_ACK);
    c.context = Some(id);
    assert_eq!(c.block_status(0, 0, 4096), Err(EINVAL));

    // And with the context on the export it goes to, BLOCK_STATUS answers with that id.
    let mut c = Raw::session(&server, "disk", Neg { structured: true, meta: true });
    assert_eq!(c.block_status(0, 0, 4096), Ok(vec![(4096, proto::STATE_HOLE | proto::STATE_ZERO)]));
}

#[test]
fn allocation_depth_context_reports_layers() {
    let server = TestServer::start();
    let id = volume(&server.store, "disk", MIB);
    let v = server.store.volume(id).unwrap();
    v.write(&[1; 8192], 0, false).unwrap();
    server.store.snapshot(id, "snap").unwrap();
    v.write(&[2; 4096], 4096, false).unwrap();
    v.write_zeroes(64 * KIB, 4096, false).unwrap();

    // Both contexts in one SET: two distinct ids.
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    c.opt_final();
    let set = proto::OPT_SET_META_CONTEXT;
    c.option(set, &meta_data("disk", &[proto::QEMU_ALLOCATION_DEPTH, proto::BASE_ALLOCATION, "qemu:"]));
    let r = c.opt_final();
    assert_eq!(r.len(), 3, "two contexts (\"qemu:\" selects none on SET), then ACK: {r:?}");
    let ids: Vec<(u32, Vec<u8>)> = r[..2].iter().map(|o| (be32(&o.data), o.data[4..].to_vec())).collect();
    let id_of = |name: &str| ids.iter().find(|(_, n)| n == name.as_bytes()).map(|(id, _)| *id).unwrap();
    let (allocation, depth) = (id_of(proto::BASE_ALLOCATION), id_of(proto::QEMU_ALLOCATION_DEPTH));
    assert_ne!(allocation, depth);
    c.option(proto::OPT_GO, &go_data("disk", &[]));
    assert_eq!(c.opt_final().last().unwrap().kind, proto::REP_ACK);

    // One BLOCK_STATUS: one chunk per context, only the last one DONE.
    let status = |c: &mut Raw, flags: u16, len: u32| {
        let cookie = c.cookie();
        c.request(flags, Command::BlockStatus, cookie, 0, len);
        let chunks = c.chunks(cookie);
        assert_eq!(chunks.len(), 2, "{chunks:?}");
        assert!(!chunks[0].done() && chunks[1].done());
        let mut by_id = std::collections::BTreeMap::new();
        for ch in &chunks {
            assert_eq!(ch.kind, proto::REPLY_TYPE_BLOCK_STATUS);
            let d: Vec<(u32, u32)> = ch.payload[4..].chunks(8).map(|d| (be32(d), be32(&d[4..]))).collect();
            by_id.insert(be32(&ch.payload), d);
        }
        (by_id[&allocation].clone(), by_id[&depth].clone())
    };
    let (alloc, depths) = status(&mut c, 0, 128 * KIB as u32);
    let k4 = 4096u32;
    assert_eq!(alloc, vec![(2 * k4, 0), (14 * k4, 3), (k4, proto::STATE_ZERO), (15 * k4, 3)]);
    // Block 0 is in the snapshot's layer (depth 2), block 1 was rewritten in the head (1),
    // the zeroed block is held by the head (1), the rest by no layer (0).
    assert_eq!(depths, vec![(k4, 2), (k4, 1), (14 * k4, 0), (k4, 1), (15 * k4, 0)]);
    // REQ_ONE: one descriptor per context.
    let (alloc, depths) = status(&mut c, proto::CMD_FLAG_REQ_ONE, 128 * KIB as u32);
    assert_eq!((alloc, depths), (vec![(2 * k4, 0)], vec![(k4, 2)]));

    // The snapshot export counts from its own layer.
    let mut s = Raw::haggling(&server);
    s.option(proto::OPT_STRUCTURED_REPLY, &[]);
    s.opt_final();
    s.option(set, &meta_data("disk@snap", &[proto::QEMU_ALLOCATION_DEPTH]));
    let r = s.opt_final();
    s.context = Some(be32(&r[0].data));
    s.option(proto::OPT_GO, &go_data("disk@snap", &[]));
    s.opt_final();
    assert_eq!(s.block_status(0, 0, 16 * KIB as u32), Ok(vec![(2 * k4, 1), (2 * k4, 0)]));
}

// ---------------------------------------------------------------------------------------------
// 5. Transmission with simple replies.

#[test]
fn simple_replies_and_errors() {
    let server = TestServer::start();
    let id = volume(&server.store, "disk", 4 * MIB);
    let mut c = Raw::session(&server, "disk", Neg::default());
    assert_eq!((c.size, c.flags), (4 * MIB, RW_FLAGS));

    // Round trip, unaligned, across blocks.
    let data = pattern(8192 + 300, 5);
    assert_eq!(c.write(4096 + 100, &data), 0);
    assert_eq!(c.read_simple(4096 + 100, data.len() as u32), Ok(data.clone()));
    // Up to the last byte.
    assert_eq!(c.write(4 * MIB - 1000, &data[..1000]), 0);
    assert_eq!(c.read_simple(4 * MIB - 1000, 1000), Ok(data[..1000].to_vec()));

    // Read past the end: EINVAL and no data (the next reply parses).
    assert_eq!(c.read_simple(4 * MIB - 512, 1024), Err(EINVAL));
    assert_eq!(c.read_simple(4 * MIB, 1), Err(EINVAL));
    assert_eq!(c.read_simple(u64::MAX - 10, 100), Err(EINVAL), "offset + length overflows");
    // Write past the end: ENOSPC, and its payload is consumed.
    assert_eq!(c.write(4 * MIB - 512, &[1u8; 1024]), ENOSPC);
    assert_eq!(c.write(u64::MAX - 10, &[1u8; 100]), ENOSPC);
    assert_eq!(c.read_simple(4 * MIB - 512, 512), Ok(data[488..1000].to_vec()), "nothing of it was written");
    assert_eq!(c.command(0, Command::WriteZeroes, 4 * MIB, 4096), ENOSPC);
    // Trim past the end: EINVAL, as the spec suggests. Unknown command flags: EINVAL.
    assert_eq!(c.command(0, Command::Trim, 4 * MIB - 512, 1024), EINVAL);
    assert_eq!(c.command(1 << 9, Command::Flush, 0, 0), EINVAL);
    // Zero-length write and read.
    assert_eq!(c.write(0, &[]), 0);
    assert_eq!(c.write(4 * MIB, &[]), 0);
    assert_eq!(c.read_simple(100, 0), Ok(Vec::new()));
    // Unknown commands and commands nobody negotiated.
    assert_eq!(c.command(0, Command::Unknown(99), 0, 512), EINVAL);
    assert_eq!(c.command(0, Command::Unknown(0xffff), 0, 0), EINVAL);
    assert_eq!(c.command(0, Command::BlockStatus, 0, 4096), EINVAL, "no metadata context");
    assert_eq!(c.command(proto::CMD_FLAG_DF, Command::Read, 0, 512), EINVAL, "DF without structured replies");
    // Trim, write_zeroes (also NO_HOLE and FAST_ZERO), cache, flush, FUA.
    assert_eq!(c.command(0, Command::Trim, 4096 + 100, 4096), 0);
    assert_eq!(c.command(0, Command::WriteZeroes, 4096 + 4196, 1000), 0);
    assert_eq!(c.command(proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FUA, Command::WriteZeroes, 4096 + 5196, 100), 0);
    let mut want = data.clone();
    want[..5196].fill(0);
    assert_eq!(c.read_simple(4096 + 100, data.len() as u32), Ok(want));
    let nf = proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO;
    assert_eq!(c.command(nf, Command::WriteZeroes, 0, 4096), 95, "NO_HOLE zeroing is not fast: ENOTSUP");
    assert_eq!(c.command(0, Command::Cache, 0, 4096), 0);
    assert_eq!(c.command(0, Command::Cache, 4 * MIB, 4096), EINVAL);
    assert_eq!(c.write_flags(proto::CMD_FLAG_FUA, 0, b"fua"), 0);
    assert_eq!(c.command(0, Command::Flush, 0, 0), 0);
    assert_eq!(store_read(&server.store, "disk", 0, 3), b"fua");

    // The snapshot export refuses every kind of write with EPERM.
    server.store.snapshot(id, "s1").unwrap();
    let mut s = Raw::session(&server, "disk@s1", Neg::default());
    assert_eq!((s.size, s.flags), (4 * MIB, RO_FLAGS));
    assert_eq!(s.write(0, b"nope"), EPERM);
    assert_eq!(s.command(0, Command::WriteZeroes, 0, 4096), EPERM);
    assert_eq!(s.command(0, Command::Trim, 0, 4096), EPERM);
    assert_eq!(s.command(0, Command::Flush, 0, 0), 0);
    assert_eq!(s.read_simple(0, 3), Ok(b"fua".to_vec()));

    // NBD_CMD_DISC: the server answers what came before, then closes.
    let cookie = c.cookie();
    c.request(0, Command::Flush, cookie, 0, 0);
    c.disconnect();
    assert_eq!(c.simple(), (cookie, 0));
    c.assert_closed("after NBD_CMD_DISC");
}

#[test]
fn a_disk_error_fails_that_disks_requests_and_the_sessions_go_on() {
    use cairn_volume::storage::{Fault, FaultyStorage, MemStorage, Storage};
    let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
    let control = faulty.control();
    let store = Store::open(Arc::new(faulty) as Arc<dyn Storage>, StoreOptions::default()).unwrap();
    let server =
        TestServer::start_on(tempfile::tempdir().unwrap(), Arc::new(store), ServerConfig::default(), false, |s| {
            Arc::new(VolumeExports::new(s))
        });
    volume(&server.store, "disk", 4 * MIB);
    volume(&server.store, "other", 4 * MIB);
    let mut c = Raw::session(&server, "disk", Neg::default());
    let mut o = Raw::session(&server, "other", Neg::default());
    let data = pattern(8192, 3);
    assert_eq!(c.write(0, &data), 0);
    // The flush's first storage operation, the data sync, fails once: the disk may have
    // dropped those pages, so the volume refuses writes and flushes until the store is
    // reopened, though the storage works again. Reads go on.
    control.fail_once(0, Fault::Io, true);
    assert_eq!(c.command(0, Command::Flush, 0, 0), EIO);
    assert_eq!(c.write(0, b"retry"), EIO);
    assert_eq!(c.command(0, Command::Flush, 0, 0), EIO, "a retried flush does not claim what may be lost");
    assert_eq!(c.read_simple(0, data.len() as u32), Ok(data.clone()));
    // The other disk, in a session of its own, is not affected.
    assert_eq!(o.write(0, b"fine"), 0);
    assert_eq!(o.command(0, Command::Flush, 0, 0), 0);
    assert_eq!(store_read(&server.store, "other", 0, 4), b"fine");
}

#[test]
fn a_reply_that_cannot_be_sent_whole_ends_the_connection() {
    let server = TestServer::start();
    volume(&server.store, "disk", 4 * MIB);
    let mut c = Raw::session(&server, "disk", Neg::default());
    let data = pattern(MIB as usize, 5);
    assert_eq!(c.write(0, &data), 0);
    assert_eq!(c.command(0, Command::Flush, 0, 0), 0);
    // The volume's data files lose all but their first 4 KiB behind the engine's back, as a
    // failing disk might. A large read goes out from the page cache by sendfile, after its
    // reply header: the data stops midway, and the client must not be left waiting for it.
    let mut cut = 0;
    for entry in std::fs::read_dir(server.dir.path().join("volumes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e.to_string_lossy().starts_with('d')) {
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
            cut += 1;
        }
    }
    assert!(cut > 0, "the volume has a data file");
    // A new session, which has made no large write: its small writes run inline, not on a
    // writer thread.
    drop(c);
    let mut c = Raw::session(&server, "disk", Neg::default());
    let cookie = c.cookie();
    c.request(0, Command::Read, cookie, 0, MIB as u32);
    // The server closes its side as soon as the data fails. Its own give-up on a client that
    // sends nothing more comes later (5 s), so this bound tells the two apart.
    c.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let end = c.s.read_to_end(&mut got);
    assert!(end.is_ok(), "the connection stays open with the reply unfinished: {end:?} after {} bytes", got.len());
    assert!(got.len() < 16 + MIB as usize, "the reply cannot have been whole");
    // Changes the client sends after that are still made (their replies go nowhere), each of
    // them, then flushed at the disconnect.
    let mut wire = Vec::new();
    let mut expected = data[..1536].to_vec();
    for i in 0..3u64 {
        let small = pattern(512, 40 + i);
        wire.extend(request_bytes(Command::Write, 50 + i, i * 512, 512));
        wire.extend_from_slice(&small);
        expected[(i * 512) as usize..((i + 1) * 512) as usize].copy_from_slice(&small);
    }
    wire.extend(request_bytes(Command::Disconnect, 60, 0, 0));
    c.s.write_all(&wire).unwrap();
    drop(c);
    let deadline = Instant::now() + TIMEOUT;
    while store_read(&server.store, "disk", 0, 1536) != expected {
        assert!(Instant::now() < deadline, "changes sent after the failed reply were not all made");
        std::thread::yield_now();
    }
    // The server and its other connections are fine.
    expected.extend_from_slice(&data[1536..4096]);
    let mut other = Raw::session(&server, "disk", Neg::default());
    assert_eq!(other.read_simple(0, 4096), Ok(expected));
}

// ---------------------------------------------------------------------------------------------
// 6. Structured replies: sparse reads, DF, block status, error chunks.

#[test]
fn structured_reads_and_block_status() {
    let server = TestServer::start();
    volume(&server.store, "disk", 8 * MIB);
    let mut c = Raw::session(&server, "disk", Neg { structured: true, meta: true });
    assert_eq!(c.flags, RW_FLAGS | proto::FLAG_SEND_DF);
    let hole_flags = proto::STATE_HOLE | proto::STATE_ZERO;

    // [1 MiB, 1.5 MiB) data, [1.5, 2) never written.
    let data = pattern(512 * KIB as usize, 6);
    assert_eq!(c.write(MIB, &data), 0);
    let (chunks, got) = c.read_structured(0, MIB, MIB as u32);
    let mut want = data.clone();
    want.resize(MIB as usize, 0);
    assert_eq!(got, Ok(want.clone()));
    assert_eq!(
        layout(&chunks),
        [(proto::REPLY_TYPE_OFFSET_DATA, MIB, 512 * KIB), (proto::REPLY_TYPE_OFFSET_HOLE, MIB + 512 * KIB, 512 * KIB)]
    );
    // The DONE flag is on the hole, the last chunk (checked in assemble_read), and the chunk
    // header's length is exact: 8 + data for OFFSET_DATA, 12 for OFFSET_HOLE.
    assert_eq!(chunks[0].payload.len() as u64, 8 + 512 * KIB);

    // With DF: one OFFSET_DATA chunk with every byte, zeros included.
    let (chunks, got) = c.read_structured(proto::CMD_FLAG_DF, MIB, MIB as u32);
    assert_eq!(got, Ok(want.clone()));
    assert_eq!(layout(&chunks), [(proto::REPLY_TYPE_OFFSET_DATA, MIB, MIB)]);

    // Unaligned, reaching into the hole beyond.
    let (chunks, got) = c.read_structured(0, MIB + 1000, MIB as u32);
    let mut want2 = data[1000..].to_vec();
    want2.resize(MIB as usize, 0);
    assert_eq!(got, Ok(want2));
    assert_eq!(
        layout(&chunks),
        [
            (proto::REPLY_TYPE_OFFSET_DATA, MIB + 1000, 512 * KIB - 1000),
            (proto::REPLY_TYPE_OFFSET_HOLE, MIB + 512 * KIB, 512 * KIB + 1000)
        ]
    );

    // A zeroed stretch in the middle of the data reads as a hole too.
    assert_eq!(c.command(0, Command::WriteZeroes, MIB + 256 * KIB, 128 * KIB as u32), 0);
    want[256 * KIB as usize..384 * KIB as usize].fill(0);
    let (chunks, got) = c.read_structured(0, MIB, MIB as u32);
    assert_eq!(got, Ok(want.clone()));
    let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            proto::REPLY_TYPE_OFFSET_DATA,
            proto::REPLY_TYPE_OFFSET_HOLE,
            proto::REPLY_TYPE_OFFSET_DATA,
            proto::REPLY_TYPE_OFFSET_HOLE
        ]
    );
    // Entirely a hole.
    let (chunks, got) = c.read_structured(0, 4 * MIB, MIB as u32);
    assert_eq!(got, Ok(vec![0; MIB as usize]));
    assert_eq!(layout(&chunks), [(proto::REPLY_TYPE_OFFSET_HOLE, 4 * MIB, MIB)]);
    // Small reads are sent as data; a zero-length read is a lone NONE chunk with DONE.
    assert_eq!(c.read_structured(0, MIB - 10, 20).1, Ok([vec![0; 10], data[..10].to_vec()].concat()));
    let (chunks, got) = c.read_structured(0, 0, 0);
    assert_eq!(got, Ok(Vec::new()));
    assert_eq!(layout(&chunks), [(proto::REPLY_TYPE_NONE, 0, 0)]);

    // Errors on READ come as one ERROR chunk (type 32769, DONE), never a simple reply.
    for (flags, offset, len) in [(0, 8 * MIB - 512, 1024), (proto::CMD_FLAG_DF, 8 * MIB, 1), (0, u64::MAX, 2)] {
        let (chunks, got) = c.read_structured(flags, offset, len);
        assert_eq!(got, Err(EINVAL));
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].kind, 32769);
    }
    // The connection is in step after all of that.
    assert_eq!(c.read(MIB, 16), data[..16].to_vec());

    // BLOCK_STATUS. Layout of [0, 1 MiB) of a fresh volume:
    //   [0, 64K) data, [64K, 192K) zeroed, [192K, 1M) hole, with an unaligned zeroing in the
    //   hole (whose partial blocks become data) and a write at the end.
    let vid = volume(&server.store, "bs", MIB);
    let mut b = Raw::session(&server, "bs", Neg { structured: true, meta: true });
    assert_eq!(b.write(0, &pattern(64 * KIB as usize, 7)), 0);
    assert_eq!(b.command(0, Command::WriteZeroes, 64 * KIB, 128 * KIB as u32), 0);
    assert_eq!(b.command(0, Command::WriteZeroes, 300_000, 10_000), 0);
    assert_eq!(b.write(MIB - 4096, &[9u8; 4096]), 0);
    let d = b.block_status(0, 0, MIB as u32).unwrap();
    assert_eq!(
        d[..3],
        [(64 * KIB as u32, 0), (128 * KIB as u32, proto::STATE_ZERO), (299_008 - 192 * 1024, hole_flags)]
    );
    // Every descriptor agrees with the volume's own allocation map.
    let vol = server.store.volume(vid).unwrap();
    let mut expected: Vec<(u32, u32)> = Vec::new();
    for e in vol.allocation(0, MIB).unwrap() {
        let f = match e.kind {
            Allocation::Data => 0,
            Allocation::Zero => proto::STATE_ZERO,
            Allocation::Hole => hole_flags,
        };
        match expected.last_mut() {
            Some((l, lf)) if *lf == f => *l += e.length as u32,
            _ => expected.push((e.length as u32, f)),
        }
    }
    assert_eq!(d, expected);
    assert_eq!(d.iter().map(|(l, _)| u64::from(*l)).sum::<u64>(), MIB, "descriptors cover the request");
    assert_eq!(d.last(), Some(&(4096, 0)));
    // Unaligned queries start at the offset asked for.
    let d = b.block_status(0, 1000, 100_000).unwrap();
    assert_eq!(d[0], (64 * 1024 - 1000, 0));
    assert_eq!(d.iter().map(|(l, _)| u64::from(*l)).sum::<u64>(), 100_000);
    // Past the end: EINVAL, as the spec asks.
    assert_eq!(b.block_status(0, MIB - 4096, 1 << 30), Err(EINVAL));
    // REQ_ONE: exactly one descriptor, never longer than the request.
    let one = proto::CMD_FLAG_REQ_ONE;
    assert_eq!(b.block_status(one, 0, MIB as u32), Ok(vec![(64 * KIB as u32, 0)]));
    assert_eq!(b.block_status(one, 0, 1000), Ok(vec![(1000, 0)]));
    assert_eq!(b.block_status(one, 32 * KIB, MIB as u32 - 32 * KIB as u32), Ok(vec![(32 * KIB as u32, 0)]));
    assert_eq!(b.block_status(one, 64 * KIB, 4096), Ok(vec![(4096, proto::STATE_ZERO)]));
    assert_eq!(b.block_status(one, 200 * KIB, 512), Ok(vec![(512, hole_flags)]));
    // Zero length and past the end: EINVAL in an error chunk; the connection goes on.
    assert_eq!(b.block_status(0, 0, 0), Err(EINVAL));
    assert_eq!(b.block_status(0, MIB, 4096), Err(EINVAL));
    assert_eq!(b.block_status(one, u64::MAX, 4096), Err(EINVAL));
    assert_eq!(b.read(0, 4), pattern(4, 7));
    // Writes in a structured session may get simple replies; errors there too.
    assert_eq!(b.write(MIB, &[1]), ENOSPC);
}

// ---------------------------------------------------------------------------------------------
// 7. Many requests in flight.

#[test]
fn sixty_four_requests_in_flight() {
    let server = TestServer::start();
    let id = volume(&server.store, "disk", 16 * MIB);
    // Region A, [0, 4 MiB), is known before the batch; the batch reads it and writes region B.
    let a = pattern(4 * MIB as usize, 70);
    server.store.volume(id).unwrap().write(&a, 0, false).unwrap();
    for (round, structured) in [(0u64, false), (1, true)] {
        let mut c = Raw::session(&server, "disk", Neg { structured, meta: false });
        let b_base = 8 * MIB + round * 4 * MIB;
        enum Expect {
            Write,
            Read(Vec<u8>),
            Flush,
        }
        let mut expect: HashMap<u64, Expect> = HashMap::new();
        let mut order = Vec::new();
        let mut wire = Vec::new();
        for i in 0..64u64 {
            let cookie = 0xc0ff_ee00_0000_0000 ^ (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 8) ^ round;
            let (len, offset) = (16 * KIB + i * 512, i * 64 * KIB);
            let req = |flags, command, offset, length| Request { flags, command, cookie, offset, length };
            match i % 4 {
                0 | 1 => {
                    let flags = if i % 8 == 1 { proto::CMD_FLAG_FUA } else { 0 };
                    wire.extend_from_slice(&proto::encode_request(&req(
                        flags,
                        Command::Write,
                        b_base + offset,
                        len as u32,
                    )));
                    wire.extend(pattern(len as usize, 1000 + i + round * 64));
                    expect.insert(cookie, Expect::Write);
                }
                2 => {
                    wire.extend_from_slice(&proto::encode_request(&req(0, Command::Read, offset, len as u32)));
                    expect.insert(cookie, Expect::Read(a[offset as usize..(offset + len) as usize].to_vec()));
                }
                _ => {
                    wire.extend_from_slice(&proto::encode_request(&req(0, Command::Flush, 0, 0)));
                    expect.insert(cookie, Expect::Flush);
                }
            }
            order.push(cookie);
        }
        assert_eq!(expect.len(), 64, "cookies are distinct");
        // All 64 requests go out before any reply is read.
        c.send(&wire);
        let mut answered = Vec::new();
        let mut reads: HashMap<u64, Vec<Chunk>> = HashMap::new();
        while answered.len() < 64 {
            match c.reply() {
                Reply::Simple { cookie, error } => {
                    assert_eq!(error, 0, "cookie {cookie:#x}");
                    match expect.get(&cookie) {
                        Some(Expect::Read(want)) => {
                            assert!(!structured, "simple reply to a read in a structured session");
                            assert_eq!(&c.read_n(want.len()), want, "read data for {cookie:#x}");
                        }
                        Some(_) => {}
                        None => panic!("reply for unknown cookie {cookie:#x}"),
                    }
                    answered.push(cookie);
                }
                Reply::Chunk(ch) => {
                    let cookie = ch.cookie;
                    let done = ch.done();
                    reads.entry(cookie).or_default().push(ch);
                    if done {
                        let Some(Expect::Read(want)) = expect.get(&cookie) else {
                            panic!("structured reply for a non-read cookie {cookie:#x}");
                        };
                        let offset = be64(&reads[&cookie][0].payload);
                        let got = assemble_read(&reads[&cookie], offset, want.len() as u32);
                        assert_eq!(got.as_ref(), Ok(want), "read data for {cookie:#x}");
                        answered.push(cookie);
                    }
                }
            }
        }
        let unique: HashSet<u64> = answered.iter().copied().collect();
        assert_eq!(unique.len(), 64, "every cookie answered exactly once");
        assert_eq!(unique, order.iter().copied().collect::<HashSet<_>>());
        if answered != order {
            eprintln!("round {round}: replies came out of order (allowed)");
        }
        // Everything the batch wrote is there.
        for i in (0..64u64).filter(|i| i % 4 < 2) {
            let len = 16 * KIB + i * 512;
            assert_eq!(c.read(b_base + i * 64 * KIB, len as u32), pattern(len as usize, 1000 + i + round * 64));
        }
    }
}

/// Reads of 64 KiB and more on a plain socket go from the data files' pages to the socket
/// with sendfile, in pieces as the socket takes them. Pipelined far past what the socket
/// buffers hold, every such reply still carries exactly the engine's bytes: data from two
/// layers, a trimmed range (zeros between file parts), a never-written half (zeros longer
/// than one vectored write sends) and unaligned ends. A client that leaves in the middle of
/// such a reply costs nobody else anything.
#[test]
fn large_reads_arrive_whole_through_a_full_socket() {
    let server = TestServer::start();
    let size = 16 * MIB;
    let id = volume(&server.store, "disk", size);
    let disk = server.store.volume(id).unwrap();
    disk.write(&pattern(size as usize / 2, 81), 0, false).unwrap();
    server.store.snapshot(id, "under").unwrap();
    disk.write(&pattern(2 * MIB as usize + 4321, 82), 3 * MIB + 777, false).unwrap();
    disk.trim(6 * MIB, MIB, false).unwrap();
    let want = store_read(&server.store, "disk", 0, size as usize);
    assert!(want[6 * MIB as usize..7 * MIB as usize].iter().all(|&b| b == 0), "the trimmed range reads as zeros");

    assert!(want[size as usize / 2..].iter().all(|&b| b == 0), "the unwritten half reads as zeros");

    // (offset, length): just under and at the threshold, unaligned, across both layers and
    // the trimmed range, the written half with 8 MiB of zeros after it, and the whole disk.
    let reads: Vec<(u64, u32)> = [
        (4096, 64 * KIB as u32 - 1),
        (MIB + 1, 64 * KIB as u32),
        (777, MIB as u32),
        (3 * MIB - 5, 4 * MIB as u32 + 11),
        (3, size as u32 - 3),
        (0, size as u32),
    ]
    .repeat(2);
    // Simple replies; structured with DF (zeros inline); structured, holes as chunks.
    for (structured, flags) in [(false, 0), (true, proto::CMD_FLAG_DF), (true, 0)] {
        let mut c = Raw::session(&server, "disk", Neg { structured, meta: false });
        let mut wire = Vec::new();
        for (cookie, &(offset, length)) in reads.iter().enumerate() {
            let request = Request { flags, command: Command::Read, cookie: cookie as u64, offset, length };
            wire.extend_from_slice(&proto::encode_request(&request));
        }
        // About 75 MiB of replies (in the simple session) queue up before the first byte is taken.
        c.send(&wire);
        let mut chunks: HashMap<u64, Vec<Chunk>> = HashMap::new();
        let mut answered = HashSet::new();
        while answered.len() < reads.len() {
            let (cookie, got) = match c.reply() {
                Reply::Simple { cookie, error } => {
                    assert_eq!(error, 0, "read {cookie}");
                    (cookie, c.read_n(reads[cookie as usize].1 as usize))
                }
                Reply::Chunk(chunk) => {
                    let (cookie, done) = (chunk.cookie, chunk.done());
                    chunks.entry(cookie).or_default().push(chunk);
                    if !done {
                        continue;
                    }
                    let (offset, length) = reads[cookie as usize];
                    let got = assemble_read(&chunks[&cookie], offset, length);
                    (cookie, got.unwrap_or_else(|e| panic!("read {cookie}: error {e}")))
                }
            };
            let (offset, length) = reads[cookie as usize];
            let expected = &want[offset as usize..(offset + u64::from(length)) as usize];
            assert!(
                got == expected,
                "read {cookie} ({offset}+{length}, structured {structured}, flags {flags}) differs"
            );
            assert!(answered.insert(cookie), "read {cookie} answered twice");
        }
        c.disconnect();
        c.assert_closed("NBD_CMD_DISC");
    }

    // A client that takes part of a large reply and leaves.
    let mut quitter = Raw::session(&server, "disk", Neg::default());
    quitter.send(&same_requests(16, Command::Read, size as u32));
    assert_eq!(quitter.simple(), (0, 0));
    quitter.read_n(100 * KIB as usize);
    drop(quitter);
    check_fresh(&server, "disk", 1);
}

// ---------------------------------------------------------------------------------------------
// 8. Bad input never crashes or hangs the server.

#[test]
fn abusive_clients_do_not_disturb_others() {
    let server = TestServer::start();
    volume(&server.store, "disk", 8 * MIB);
    let mut other = Raw::session(&server, "disk", Neg::default());
    check_alive(&mut other, 0);
    let mut round = 0;
    let mut after = |other: &mut Raw, what: &str| {
        round += 1;
        check_alive(other, round);
        check_fresh(&server, "disk", round);
        eprintln!("survived: {what}");
    };

    // Bad request magic, after a request that is answered first.
    let mut c = Raw::session(&server, "disk", Neg::default());
    let cookie = c.cookie();
    c.request(0, Command::Flush, cookie, 0, 0);
    let mut bad =
        proto::encode_request(&Request { flags: 0, command: Command::Read, cookie: 9, offset: 0, length: 512 });
    bad[3] ^= 1;
    c.send(&bad);
    assert_eq!(c.simple(), (cookie, 0));
    c.assert_closed("bad request magic");
    after(&mut other, "bad request magic");

    // A write longer than 32 MiB ends the connection without the server reading its payload.
    for len in [(32 << 20) + 1, u32::MAX] {
        let mut c = Raw::session(&server, "disk", Neg::default());
        let cookie = c.cookie();
        c.request(0, Command::Write, cookie, 0, len);
        c.send_lossy(&[0xabu8; 4096]);
        c.assert_closed("write longer than 32 MiB");
        after(&mut other, "oversized write");
    }
    // A read longer than 32 MiB is just an error (the export is smaller anyway).
    let mut c = Raw::session(&server, "disk", Neg::default());
    assert_eq!(c.read_simple(0, (32 << 20) + 1), Err(EINVAL));

    // The client leaves in the middle of a write's payload: nothing of it is written.
    let before = other.read(64 * KIB, 64 * KIB as u32);
    let mut c = Raw::session(&server, "disk", Neg::default());
    let cookie = c.cookie();
    c.request(0, Command::Write, cookie, 64 * KIB, 64 * KIB as u32);
    c.send(&[0xee; 30_000]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    c.assert_closed("client gone mid-payload");
    drop(c);
    assert_eq!(other.read(64 * KIB, 64 * KIB as u32), before, "a partial write is not applied");
    after(&mut other, "disconnect mid-payload");

    // ... or in the middle of a request header, or right after the GO.
    for cut in [1usize, 10, 27] {
        let mut c = Raw::session(&server, "disk", Neg { structured: true, meta: true });
        let h = proto::encode_request(&Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 1 });
        c.send(&h[..cut]);
        drop(c);
        after(&mut other, "disconnect mid-header");
    }
    drop(Raw::session(&server, "disk", Neg::default()));
    after(&mut other, "disconnect right after GO");

    // A client that asks for a lot and leaves without reading the replies.
    let mut c = Raw::session(&server, "disk", Neg::default());
    for i in 0..16u64 {
        c.request(0, Command::Read, i, 0, MIB as u32);
    }
    drop(c);
    after(&mut other, "disconnect with 16 MiB of replies pending");

    // Leaving in every phase of the handshake.
    drop(Raw::connect(&server.socket));
    drop(Raw::greeted(&server));
    drop(Raw::haggling(&server));
    let mut c = Raw::haggling(&server);
    c.send(&Raw::option_header(proto::OPT_GO, 100)[..12]);
    drop(c);
    let mut c = Raw::haggling(&server);
    c.send(&Raw::option_header(proto::OPT_GO, 100));
    c.send(&[0; 50]);
    drop(c);
    after(&mut other, "disconnects during the handshake");

    // Garbage instead of the client flags, of every kind.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"NBDMAGICIHAVEOPT",
        &[0xff; 64],
        &[0; 3],
    ] {
        let mut c = Raw::greeted(&server);
        c.send_lossy(garbage);
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        c.drain_to_close("garbage at the handshake");
        after(&mut other, "garbage at the handshake");
    }
    // Random bytes after the greeting, from a fixed seed.
    for seed in 0..24u64 {
        let len = (pattern(1, seed)[0] as usize) * 3;
        let mut bytes = pattern(len, 0xbad0 + seed);
        if seed % 2 == 0 && len >= 4 {
            // Valid flags, so the garbage reaches option haggling.
            bytes[..4].copy_from_slice(&3u32.to_be_bytes());
            if seed % 4 == 0 && len >= 12 {
                bytes[4..12].copy_from_slice(&proto::OPTION_MAGIC.to_be_bytes());
            }
        }
        let mut c = Raw::greeted(&server);
        c.send_lossy(&bytes);
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        c.drain_to_close("random bytes at the handshake");
    }
    after(&mut other, "random bytes at the handshake");
    other.disconnect();
    other.assert_closed("DISC");
}

/// One fuzz message: options and requests with random fields, some of them well formed.
#[derive(Debug, Clone)]
enum Msg {
    Option { code: u32, data: Vec<u8> },
    LyingOption { code: u32, declared: u32, data: Vec<u8> },
    Structured,
    Meta,
    Go,
    Request { flags: u16, cmd: u16, offset: u64, length: u32, payload: Vec<u8> },
    Garbage(Vec<u8>),
}

impl Msg {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Msg::Option { code, data } => {
                out.extend(Raw::option_header(*code, data.len() as u32));
                out.extend_from_slice(data);
            }
            Msg::LyingOption { code, declared, data } => {
                out.extend(Raw::option_header(*code, *declared));
                out.extend_from_slice(data);
            }
            Msg::Structured => out.extend(Raw::option_header(proto::OPT_STRUCTURED_REPLY, 0)),
            Msg::Meta => {
                let d = meta_data("fuzz", &[proto::BASE_ALLOCATION]);
                out.extend(Raw::option_header(proto::OPT_SET_META_CONTEXT, d.len() as u32));
                out.extend(d);
            }
            Msg::Go => {
                let d = go_data("fuzz", &[proto::INFO_BLOCK_SIZE]);
                out.extend(Raw::option_header(proto::OPT_GO, d.len() as u32));
                out.extend(d);
            }
            Msg::Request { flags, cmd, offset, length, payload } => {
                let command = match cmd {
                    0..=7 => [
                        Command::Read,
                        Command::Write,
                        Command::Disconnect,
                        Command::Flush,
                        Command::Trim,
                        Command::Cache,
                        Command::WriteZeroes,
                        Command::BlockStatus,
                    ][*cmd as usize],
                    c => Command::Unknown(*c),
                };
                out.extend(proto::encode_request(&Request {
                    flags: *flags,
                    command,
                    cookie: out.len() as u64,
                    offset: *offset,
                    length: *length,
                }));
                out.extend_from_slice(payload);
            }
            Msg::Garbage(g) => out.extend_from_slice(g),
        }
    }
}

/// Options, some well formed, some not, some with a length that lies.
fn option_strategy() -> impl proptest::strategy::Strategy<Value = Msg> {
    use proptest::prelude::*;
    let bytes = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        3 => (0u32..14, bytes.clone()).prop_map(|(code, data)| Msg::Option { code, data }),
        1 => (0u32..14, any::<u32>(), bytes).prop_map(|(code, declared, data)| Msg::LyingOption {
            code,
            declared,
            data
        }),
        2 => Just(Msg::Structured),
        2 => Just(Msg::Meta),
    ]
}

/// Requests with random fields (writes mostly carrying exactly their payload, so that later
/// requests stay in step) and now and then garbage.
fn request_strategy() -> impl proptest::strategy::Strategy<Value = Msg> {
    use proptest::prelude::*;
    let size = 4 * MIB;
    let offset = prop_oneof![0..size, Just(size - 512), size - 4096..size + 4096, any::<u64>()];
    let length = prop_oneof![0u32..70_000, Just(0), Just(MIB as u32), Just((32 << 20) + 1), any::<u32>()];
    let flags = prop_oneof![0u16..32, any::<u16>()];
    prop_oneof![
        12 => (flags, 0u16..10, offset, length, 0usize..8).prop_map(|(flags, cmd, offset, length, how)| {
            let payload = match (cmd, how) {
                (1, 0) => vec![0x5a; (length as usize).min(1000)],
                (1, 1) => Vec::new(),
                (1, _) => vec![0xa5; (length as usize).min(70_000)],
                _ => Vec::new(),
            };
            Msg::Request { flags, cmd, offset, length, payload }
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Msg::Garbage),
    ]
}

#[test]
fn fuzzed_sessions_never_take_the_server_down() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
    use std::cell::{Cell, RefCell};
    let server = TestServer::start();
    volume(&server.store, "fuzz", 4 * MIB);
    volume(&server.store, "ctl", 4 * MIB);
    let other = RefCell::new(Raw::session(&server, "ctl", Neg::default()));
    let config = Config { cases: 96, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let flags = prop_oneof![8 => Just(3u32), 1 => Just(1u32), 1 => any::<u32>()];
    let strategy = (
        flags,
        proptest::collection::vec(option_strategy(), 0..6),
        proptest::bool::weighted(0.8),
        proptest::collection::vec(request_strategy(), 0..24),
    );
    let round = Cell::new(0u64);
    let started = Instant::now();
    runner
        .run(&strategy, |(flags, options, go, requests)| {
            round.set(round.get() + 1);
            let mut wire = flags.to_be_bytes().to_vec();
            for m in &options {
                m.encode(&mut wire);
            }
            if go {
                Msg::Go.encode(&mut wire);
            }
            for m in &requests {
                m.encode(&mut wire);
            }
            let mut c = Raw::greeted(&server);
            // A thread drains replies so that neither side blocks on a full socket.
            let mut rx = c.s.try_clone().unwrap();
            let drain = std::thread::spawn(move || {
                let mut total = 0usize;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    match rx.read(&mut buf) {
                        Ok(0) => return Ok(total),
                        Ok(n) => total += n,
                        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                            return Ok(total)
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            });
            c.send_lossy(&wire);
            let _ = c.s.shutdown(std::net::Shutdown::Write);
            if let Err(e) = drain.join().unwrap() {
                return Err(TestCaseError::fail(format!("the server neither answered nor closed: {e}")));
            }
            check_alive(&mut other.borrow_mut(), round.get());
            check_fresh(&server, "ctl", round.get());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} fuzzed sessions in {:?}", round.get(), started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 9. Graceful shutdown.

/// Copies the store's files and opens the copy: it sees exactly what was flushed (journal
/// records are written at flush only).
fn durable_copy(server: &TestServer) -> (tempfile::TempDir, Store) {
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(server.dir.path().join("volumes")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
        }
    }
    let store = Store::open_dir(
        copy.path(),
        StoreOptions { background_merge: false, merge_bytes_per_sec: None, ..StoreOptions::default() },
    )
    .expect("open the copied store");
    (copy, store)
}

#[test]
fn shutdown_answers_flushes_and_closes() {
    let mut server = TestServer::start();
    volume(&server.store, "disk", 8 * MIB);
    let mut idle = Raw::session(&server, "disk", Neg { structured: true, meta: true });
    let mut c = Raw::session(&server, "disk", Neg::default());
    // Acknowledged writes, never flushed by the client.
    let acked = pattern(256 * KIB as usize, 90);
    assert_eq!(c.write(0, &acked), 0);
    // And a batch in flight when the stop comes: whatever is answered must be durable.
    let mut wire = Vec::new();
    for i in 0..32u64 {
        let r = Request { flags: 0, command: Command::Write, cookie: 1000 + i, offset: MIB + i * 4096, length: 4096 };
        wire.extend_from_slice(&proto::encode_request(&r));
        wire.extend(pattern(4096, 2000 + i));
    }
    c.send(&wire);

    server.stop();

    let mut answered = HashSet::new();
    loop {
        let mut m = [0u8; 4];
        match c.s.read(&mut m[..1]) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("after stop: {e}"),
        }
        c.s.read_exact(&mut m[1..]).unwrap();
        assert_eq!(be32(&m), proto::SIMPLE_REPLY_MAGIC);
        let h = c.read_n(12);
        let (error, cookie) = (be32(&h), be64(&h[4..]));
        assert!(error == 0 || error == 108, "a reply during shutdown is a success or ESHUTDOWN: {error}");
        assert!((1000..1032).contains(&cookie) && answered.insert((cookie, error)), "cookie {cookie}");
    }
    eprintln!("{} of 32 in-flight writes answered before the close", answered.len());
    idle.assert_closed("an idle connection at shutdown");

    // What the server acknowledged is durable: the stop flushed the head.
    let (_dir, copy) = durable_copy(&server);
    let read = |offset: u64, len: usize| store_read(&copy, "disk", offset, len);
    assert_eq!(read(0, acked.len()), acked, "acknowledged writes survive the stop");
    for (cookie, error) in answered {
        if error == 0 {
            let i = cookie - 1000;
            assert_eq!(read(MIB + i * 4096, 4096), pattern(4096, 2000 + i), "answered write {i}");
        }
    }
    // The shared store sees it all, too.
    assert_eq!(store_read(&server.store, "disk", 0, acked.len()), acked);

    // No new connections after the stop.
    assert!(UnixStream::connect(&server.socket).is_err(), "connect after stop must fail");
}

/// One request without flags, encoded, for tests that send many at once.
fn request_bytes(command: Command, cookie: u64, offset: u64, length: u64) -> [u8; proto::REQUEST_LEN] {
    proto::encode_request(&Request { flags: 0, command, cookie, offset, length: length as u32 })
}

/// A client may send its last changes and a disconnect, then close without reading a reply.
/// The server still makes every change it read, and its flush at the disconnect covers them
/// all. Large writes and zeroings run on the connection's writer thread, apart from the
/// connection, which is what this checks.
#[test]
fn changes_sent_before_a_disconnect_are_made_and_flushed_unread() {
    const SIZE: u64 = 32 * MIB;
    const LARGE: u64 = 256 * KIB;
    let mut server = TestServer::start();
    volume(&server.store, "disk", SIZE);
    let mut c = Raw::session(&server, "disk", Neg::default());
    // The acknowledged write starts the thread. The later changes all change the volume's
    // map, which reaches the disk only at a flush: a flush made before them would miss them.
    // There are more of them than the thread makes by the time the client has sent them all.
    let mut expected = vec![0u8; SIZE as usize];
    let first = pattern((8 * MIB) as usize, 3);
    assert_eq!(c.write(24 * MIB, &first), 0, "the first, acknowledged, write");
    expected[(24 * MIB) as usize..].copy_from_slice(&first);
    let mut wire = Vec::new();
    for i in 0..24 * MIB / LARGE {
        let data = pattern(LARGE as usize, 200 + i);
        wire.extend(request_bytes(Command::Write, 100 + i, i * LARGE, LARGE));
        wire.extend_from_slice(&data);
        expected[(i * LARGE) as usize..((i + 1) * LARGE) as usize].copy_from_slice(&data);
    }
    wire.extend(request_bytes(Command::WriteZeroes, 1, 24 * MIB, 4 * MIB));
    expected[(24 * MIB) as usize..(28 * MIB) as usize].fill(0);
    wire.extend(request_bytes(Command::Trim, 2, 28 * MIB, 2 * MIB));
    expected[(28 * MIB) as usize..(30 * MIB) as usize].fill(0);
    let small = pattern(4096, 300);
    wire.extend(request_bytes(Command::Write, 3, 31 * MIB, 4096));
    wire.extend_from_slice(&small);
    expected[(31 * MIB) as usize..(31 * MIB + 4096) as usize].copy_from_slice(&small);
    wire.extend(request_bytes(Command::Disconnect, 4, 0, 0));
    c.send(&wire);
    c.s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);

    // The changes land in the shared store as the server makes them; wait for the last.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_read(&server.store, "disk", 0, SIZE as usize) != expected {
        assert!(Instant::now() < deadline, "changes sent before the disconnect were not all made");
        std::thread::yield_now();
    }
    // The stop waits for the connection's end, whose flush made them durable.
    server.stop();
    let (_dir, copy) = durable_copy(&server);
    assert!(store_read(&copy, "disk", 0, SIZE as usize) == expected, "the flush at the disconnect missed changes");
}

/// What [`Choreographed`] saw, and what it waits for.
#[derive(Default)]
struct Steps {
    /// Changes and flushes in the order they were made.
    log: Vec<String>,
    client_gone: bool,
    flushed: bool,
}

type SharedSteps = Arc<(std::sync::Mutex<Steps>, std::sync::Condvar)>;

/// A volume's export that records the order of changes and flushes, and holds back two kinds
/// of request, so that a test can put a connection's steps in an order of its choosing: a
/// read waits until the client is gone, and a write at [`Choreographed::HELD`] waits for a
/// flush, for at most [`Choreographed::HOLD`].
struct Choreographed {
    inner: Arc<dyn Export>,
    steps: SharedSteps,
}

impl Choreographed {
    const HELD: u64 = MIB;
    const HOLD: Duration = Duration::from_secs(1);

    fn log(&self, step: String) {
        let (steps, changed) = &*self.steps;
        let mut steps = steps.lock().unwrap();
        steps.flushed |= step == "flush";
        steps.log.push(step);
        changed.notify_all();
    }

    fn wait_until(&self, limit: Duration, done: impl Fn(&Steps) -> bool) {
        let (steps, changed) = &*self.steps;
        let _ = changed.wait_timeout_while(steps.lock().unwrap(), limit, |s| !done(s)).unwrap();
    }
}

impl Export for Choreographed {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        self.wait_until(TIMEOUT, |s| s.client_gone);
        self.inner.read(buf, offset)
    }
    fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        if offset == Self::HELD {
            self.wait_until(Self::HOLD, |s| s.flushed);
        }
        self.inner.write(data, offset, fua)?;
        self.log(format!("write {offset}"));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.inner.write_zeroes(offset, len, fua)?;
        self.log(format!("zero {offset}"));
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.inner.trim(offset, len, fua)?;
        self.log(format!("trim {offset}"));
        Ok(())
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.log("flush".into());
        self.inner.flush()
    }
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocExtent>, ExportError> {
        self.inner.allocation(offset, len)
    }
    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>, ExportError> {
        self.inner.allocation_depth(offset, len)
    }
}

struct ChoreographedExports {
    inner: VolumeExports,
    steps: SharedSteps,
}

impl Exports for ChoreographedExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, LookupError> {
        Ok(Arc::new(Choreographed { inner: self.inner.open(name)?, steps: self.steps.clone() }))
    }
    fn list(&self) -> Vec<ExportListing> {
        self.inner.list()
    }
}

/// The order behind the test above, made certain: the connection's replies stop (the client
/// is gone) while a large write still waits on the writer thread, and another is queued
/// behind it. The server makes both, and only then flushes.
#[test]
fn a_disconnect_flushes_after_the_writer_thread_made_every_change() {
    const LARGE: u64 = 256 * KIB;
    let steps = SharedSteps::default();
    let shared = steps.clone();
    let server = TestServer::start_exporting(ServerConfig::default(), false, move |store| {
        Arc::new(ChoreographedExports { inner: VolumeExports::new(store), steps: shared })
    });
    volume(&server.store, "disk", 4 * MIB);
    let mut c = Raw::session(&server, "disk", Neg::default());
    let mut wire = Vec::new();
    for (cookie, offset) in [(1, 0), (2, Choreographed::HELD), (3, 2 * MIB)] {
        wire.extend(request_bytes(Command::Write, cookie, offset, LARGE));
        wire.extend(pattern(LARGE as usize, offset));
    }
    // Made on the connection itself, not on the writer thread: its reply is the first the
    // server sends once the client is gone, so the replies stop while the held write waits.
    wire.extend(request_bytes(Command::Read, 4, 0, 4096));
    wire.extend(request_bytes(Command::Disconnect, 5, 0, 0));
    c.send(&wire);
    c.s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    {
        let (s, changed) = &*steps;
        s.lock().unwrap().client_gone = true;
        changed.notify_all();
    }
    // Three writes and the flush at the disconnect; not stopping the server first, as that
    // would end the connection without reading all its requests.
    let (s, changed) = &*steps;
    let log = changed.wait_timeout_while(s.lock().unwrap(), TIMEOUT, |s| s.log.len() < 4).unwrap().0.log.clone();
    drop(server);
    let held = Choreographed::HELD;
    assert_eq!(log, ["write 0".to_string(), format!("write {held}"), format!("write {}", 2 * MIB), "flush".into()]);
}

/// Runs `server.stop()` on a thread and reports whether it finished within `limit`.
fn stop_within(server: TestServer, limit: Duration) -> (bool, std::thread::JoinHandle<TestServer>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut server = server;
        server.stop();
        let _ = tx.send(());
        server
    });
    (rx.recv_timeout(limit).is_ok(), t)
}

/// Stops the server while `client` holds a connection in some state, and asserts the stop
/// completes within 5 s (the handshake timeout is 30 s; the grace for unsent replies 3 s). The client is
/// closed after the check either way, so a failing test still ends.
fn assert_stop_is_prompt(server: TestServer, client: Raw, what: &str) {
    let (stopped, t) = stop_within(server, Duration::from_secs(5));
    let _ = client.s.shutdown(std::net::Shutdown::Both);
    drop(client);
    t.join().unwrap();
    assert!(stopped, "stop() still waits after 5 s for {what}");
}

#[test]
fn shutdown_closes_a_client_idle_in_option_haggling() {
    let server = TestServer::start();
    volume(&server.store, "disk", MIB);
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_LIST, &[]);
    assert_eq!(c.opt_final().last(), Some(&ack(proto::OPT_LIST)));
    assert_stop_is_prompt(server, c, "a client idle in option haggling");
}

#[test]
fn shutdown_does_not_wait_for_a_client_that_never_sends_flags() {
    let server = TestServer::start();
    let c = Raw::greeted(&server);
    assert_stop_is_prompt(server, c, "a client that read the greeting and sent nothing");
}

#[test]
fn shutdown_does_not_wait_for_a_client_stalled_in_option_data() {
    let server = TestServer::start();
    let mut c = Raw::haggling(&server);
    c.send(&Raw::option_header(proto::OPT_GO, 100));
    c.send(&[0u8; 10]);
    assert_stop_is_prompt(server, c, "a client that sent 10 of 100 bytes of an option");
}

#[test]
fn shutdown_does_not_wait_for_a_stalled_payload() {
    let server = TestServer::start();
    volume(&server.store, "disk", MIB);
    let mut c = Raw::session(&server, "disk", Neg::default());
    c.request(0, Command::Write, 1, 0, 64 * KIB as u32);
    c.send(&[0u8; 1000]);
    assert_stop_is_prompt(server, c, "a client that sent 1000 of 65536 bytes of a write payload");
}

#[test]
fn shutdown_does_not_wait_for_a_client_that_does_not_read() {
    let server = TestServer::start();
    volume(&server.store, "disk", 4 * MIB);
    let mut c = Raw::session(&server, "disk", Neg::default());
    // Far more reply data than socket buffers and the reply queue hold.
    let wire = same_requests(400, Command::Read, MIB as u32);
    c.send(&wire);
    assert_stop_is_prompt(server, c, "a client that does not read 400 MiB of replies");
}

#[test]
fn shutdown_does_not_wait_for_a_client_stalled_in_an_oversized_option() {
    let server = TestServer::start();
    let mut c = Raw::haggling(&server);
    c.send(&Raw::option_header(42, 1 << 20));
    c.send(&[0u8; 10]);
    assert_stop_is_prompt(server, c, "a client that sent 10 bytes of a 1 MiB option");
}

#[test]
fn shutdown_does_not_wait_for_a_stalled_tls_handshake() {
    let Some((_pki_dir, _pki, server)) = tls_setup(true, false, &[]) else {
        return;
    };
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply(), ack(proto::OPT_STARTTLS));
    assert_stop_is_prompt(server, c, "a client that got the STARTTLS ACK and sent no ClientHello");
}

#[test]
fn flushes_of_a_client_that_does_not_read_do_not_starve_others() {
    let server = TestServer::start();
    volume(&server.store, "disk", MIB);
    let mut other = Raw::session(&server, "disk", Neg::default());
    other.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(other.command(0, Command::Flush, 0, 0), 0);
    // 20000 flushes, never reading a reply: 560 KB of requests, which the server reads in
    // full because flushes go to the blocking pool without holding up its reader.
    let mut hog = Raw::session(&server, "disk", Neg::default());
    let wire = same_requests(20_000, Command::Flush, 0);
    hog.send(&wire);
    // Another connection's flush must still be answered.
    let cookie = other.cookie();
    other.request(0, Command::Flush, cookie, 0, 0);
    let mut h = [0u8; 16];
    let answered = other.s.read_exact(&mut h);
    drop(hog);
    assert!(answered.is_ok(), "a flush on another connection got no reply within 5 s: {answered:?}");
    assert_eq!((be64(&h[8..]), be32(&h[4..])), (cookie, 0));
}

/// Resident memory of this process (the server runs in it), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn replies_for_a_client_that_does_not_read_are_bounded_in_memory() {
    let server = TestServer::start();
    let id = volume(&server.store, "disk", 64 * MIB);
    server.store.volume(id).unwrap().write(&pattern(32 * MIB as usize, 4), 0, false).unwrap();
    let before = rss();
    let mut c = Raw::session(&server, "disk", Neg::default());
    // 48 reads of 32 MiB (the maximum payload), never read: 1.5 GiB of replies.
    let wire = same_requests(48, Command::Read, 32 << 20);
    c.send(&wire);
    // Watch memory for a while (no sleeping: a bounded busy poll of /proc).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peak = 0;
    while Instant::now() < deadline {
        peak = peak.max(rss().saturating_sub(before));
        if peak > 512 * MIB {
            break;
        }
        std::thread::yield_now();
    }
    drop(c);
    assert!(peak <= 512 * MIB, "the server buffered over {} MiB of replies for one connection", peak >> 20);
}

// ---------------------------------------------------------------------------------------------
// 10. Several connections writing one export at once.

#[test]
fn concurrent_connections_write_disjoint_ranges() {
    let server = Arc::new(TestServer::start());
    volume(&server.store, "disk", 16 * MIB);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let server = server.clone();
            std::thread::spawn(move || {
                let mut c = Raw::session(&server, "disk", Neg { structured: t % 2 == 1, meta: false });
                // Pipelined: 32 writes of 64 KiB + 1 (unaligned, so neighbours share blocks),
                // interleaved with the other connections' ranges.
                let mut wire = Vec::new();
                for i in 0..32u64 {
                    let offset = (i * 4 + t) * (64 * KIB + 1);
                    let r =
                        Request { flags: 0, command: Command::Write, cookie: i, offset, length: 64 * KIB as u32 + 1 };
                    wire.extend_from_slice(&proto::encode_request(&r));
                    wire.extend(pattern(64 * KIB as usize + 1, t * 100 + i));
                }
                c.send(&wire);
                let mut seen = HashSet::new();
                for _ in 0..32 {
                    let (cookie, error) = c.simple();
                    assert_eq!(error, 0);
                    assert!(seen.insert(cookie));
                }
                assert_eq!(c.command(0, Command::Flush, 0, 0), 0);
                c.disconnect();
                c.assert_closed("DISC");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut c = Raw::session(&server, "disk", Neg { structured: true, meta: false });
    let (_dir, copy) = durable_copy(&server);
    for t in 0..4u64 {
        for i in 0..32u64 {
            let offset = (i * 4 + t) * (64 * KIB + 1);
            let want = pattern(64 * KIB as usize + 1, t * 100 + i);
            assert_eq!(c.read(offset, want.len() as u32), want, "connection {t} write {i}");
            assert_eq!(store_read(&copy, "disk", offset, want.len()), want, "flushed: connection {t} write {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Part B: TLS.

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
";

/// A CA, a server certificate (localhost, 127.0.0.1) and client certificate directories in
/// the layout libnbd and qemu expect (ca-cert.pem, client-cert.pem, client-key.pem).
struct Pki {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// A client signed by the CA.
    client_dir: PathBuf,
    /// A client signed by a different CA (but trusting the right server CA).
    rogue_dir: PathBuf,
    /// Trusts the server, has no client certificate.
    anonymous_dir: PathBuf,
    /// The good client certificate, but trusting only the other CA.
    untrusting_dir: PathBuf,
}

fn make_pki(root: &Path) -> Pki {
    let openssl = |args: &[&str]| {
        run(Cmd::new("openssl").current_dir(root).args(args));
    };
    std::fs::write(root.join("openssl.cnf"), OPENSSL_CNF).unwrap();
    for name in ["ca", "rogue-ca", "server", "client", "rogue"] {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}-key.pem"),
        ]);
    }
    for (ca, cn) in [("ca", "cairn test CA"), ("rogue-ca", "rogue CA")] {
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{ca}-key.pem"),
            "-out",
            &format!("{ca}-cert.pem"),
            "-days",
            "2",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-subj",
            &format!("/CN={cn}"),
        ]);
    }
    for (serial, (name, ca, ext, cn)) in [
        ("server", "ca", "server", "localhost"),
        ("client", "ca", "client", "cairn client"),
        ("rogue", "rogue-ca", "client", "rogue client"),
    ]
    .into_iter()
    .enumerate()
    {
        openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-config",
            "openssl.cnf",
            "-subj",
            &format!("/CN={cn}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-set_serial",
            &(serial + 2).to_string(),
            "-days",
            "2",
            "-out",
            &format!("{name}-cert.pem"),
            "-extfile",
            "openssl.cnf",
            "-extensions",
            ext,
        ]);
    }
    let client_dir = |dir: &str, ca: &str, who: Option<&str>| {
        let d = root.join(dir);
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(root.join(format!("{ca}-cert.pem")), d.join("ca-cert.pem")).unwrap();
        if let Some(who) = who {
            std::fs::copy(root.join(format!("{who}-cert.pem")), d.join("client-cert.pem")).unwrap();
            std::fs::copy(root.join(format!("{who}-key.pem")), d.join("client-key.pem")).unwrap();
        }
        d
    };
    Pki {
        ca_cert: root.join("ca-cert.pem"),
        server_cert: root.join("server-cert.pem"),
        server_key: root.join("server-key.pem"),
        client_dir: client_dir("client", "ca", Some("client")),
        rogue_dir: client_dir("rogue", "ca", Some("rogue")),
        anonymous_dir: client_dir("anonymous", "ca", None),
        untrusting_dir: client_dir("untrusting", "rogue-ca", Some("client")),
    }
}

/// Certificates in a temporary directory (kept alive by the first element) and a TLS server
/// using them; `None` (the test is skipped, or fails under CI) when openssl or one of
/// `tools` is missing.
fn tls_setup(required: bool, verify_clients: bool, tools: &[&str]) -> Option<(tempfile::TempDir, Pki, TestServer)> {
    if !have("openssl") || !tools.iter().all(|t| have(t)) {
        return None;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let server = tls_server(&pki, required, verify_clients);
    Some((pki_dir, pki, server))
}

fn tls_server(pki: &Pki, required: bool, verify_clients: bool) -> TestServer {
    let ca = verify_clients.then_some(pki.ca_cert.as_path());
    let acceptor = cairn_nbd::tls_acceptor(&pki.server_cert, &pki.server_key, ca).expect("TLS acceptor");
    let server = TestServer::start_with(ServerConfig { tls: Some(TlsMode { acceptor, required }) }, true);
    volume(&server.store, "disk", 16 * MIB);
    server
}

fn nbds_uri(server: &TestServer, certs: &Path) -> String {
    let addr = server.tcp.expect("TCP listener");
    format!("nbds://127.0.0.1:{}/disk?tls-certificates={}", addr.port(), certs.display())
}

fn nbd_uri(server: &TestServer) -> String {
    format!("nbd://127.0.0.1:{}/disk", server.tcp.expect("TCP listener").port())
}

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run(Cmd::new("nbdinfo").args(["--size", uri]));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("nbdinfo --size prints a number")
}

#[test]
fn tls_required_with_client_certificates() {
    let Some((pki_dir, pki, server)) = tls_setup(true, true, &["nbdinfo"]) else {
        return;
    };

    // Raw, over the unix socket: everything but STARTTLS and ABORT is refused before TLS.
    let mut c = Raw::haggling(&server);
    for (option, data) in [
        (proto::OPT_LIST, Vec::new()),
        (proto::OPT_GO, go_data("disk", &[])),
        (proto::OPT_INFO, go_data("disk", &[])),
        (proto::OPT_STRUCTURED_REPLY, Vec::new()),
        (42, b"unknown".to_vec()),
    ] {
        c.option(option, &data);
        let r = c.opt_final();
        assert_eq!((r.len(), r[0].option, r[0].kind), (1, option, proto::REP_ERR_TLS_REQD), "option {option}");
    }
    c.option(proto::OPT_EXPORT_NAME, b"disk");
    c.assert_closed("EXPORT_NAME without TLS in FORCEDTLS mode");
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(), ack(proto::OPT_ABORT));
    c.assert_closed("ABORT in FORCEDTLS mode");
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply(), ack(proto::OPT_STARTTLS));
    // A client that then speaks no TLS at all: the server drops it.
    c.send_lossy(b"this is not a TLS client hello, not even close.....");
    c.drain_to_close("plain text after STARTTLS");

    // Plain NBD is refused; TLS with a client certificate signed by the CA works.
    let err = run_failing(Cmd::new("nbdinfo").arg(nbd_uri(&server)));
    eprintln!("plain nbdinfo against FORCEDTLS: {}", err.trim());
    assert_eq!(nbdinfo_size(&nbds_uri(&server, &pki.client_dir)), 16 * MIB);
    run(Cmd::new("nbdinfo").args(["--is", "tls", &nbds_uri(&server, &pki.client_dir)]));

    // A client certificate from another CA, or none at all, is refused.
    let err = run_failing(Cmd::new("nbdinfo").args(["--size", &nbds_uri(&server, &pki.rogue_dir)]));
    eprintln!("rogue client certificate: {}", err.trim());
    let err = run_failing(Cmd::new("nbdinfo").args(["--size", &nbds_uri(&server, &pki.anonymous_dir)]));
    eprintln!("no client certificate: {}", err.trim());
    // A client that trusts another CA refuses the server's certificate.
    let err = run_failing(Cmd::new("nbdinfo").args(["--size", &nbds_uri(&server, &pki.untrusting_dir)]));
    eprintln!("client trusting another CA: {}", err.trim());

    // The server is fine after the refusals.
    assert_eq!(nbdinfo_size(&nbds_uri(&server, &pki.client_dir)), 16 * MIB);

    // qemu-img over TLS: write a file in, compare it back, and check it in the store.
    if !have("qemu-img") {
        return;
    }
    let src = pki_dir.path().join("src.raw");
    let mut data = pattern(16 * MIB as usize, 11);
    data[4 << 20..8 << 20].fill(0);
    write_file(&src, &data);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.client_dir.display());
    let target = format!("driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0", server.tcp.unwrap().port());
    run(Cmd::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "--object", &object, "--target-image-opts"])
        .arg(&src)
        .arg(&target));
    run(Cmd::new("qemu-img")
        .args(["compare", "--object", &object, "--image-opts"])
        .arg(format!("driver=file,filename={}", src.display()))
        .arg(&target));
    assert!(store_read(&server.store, "disk", 0, data.len()) == data, "the store holds what qemu-img wrote");
    eprintln!("qemu-img convert and compare over TLS: ok");
}

#[test]
fn forced_tls_refuses_malformed_options_with_tls_reqd() {
    let Some((_pki_dir, _pki, server)) = tls_setup(true, false, &[]) else {
        return;
    };
    let mut c = Raw::haggling(&server);
    // "If the server receives any other option, including NBD_OPT_INFO and unsupported
    // options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated."
    let mut kinds = Vec::new();
    for (option, data) in [
        (proto::OPT_GO, string_field("disk")),
        (proto::OPT_LIST, b"x".to_vec()),
        (proto::OPT_SET_META_CONTEXT, vec![0, 0]),
        (42, vec![0u8; proto::MAX_OPTION_LEN as usize + 1]),
    ] {
        c.option(option, &data);
        let r = c.opt_final();
        kinds.push((option, r[0].kind));
    }
    let want: Vec<(u32, u32)> = kinds.iter().map(|(o, _)| (*o, proto::REP_ERR_TLS_REQD)).collect();
    assert_eq!(kinds, want);
}

#[test]
fn tls_optional_serves_both() {
    let Some((_pki_dir, pki, server)) = tls_setup(false, false, &["nbdinfo"]) else {
        return;
    };
    server.store.volume(server.store.volume_id("disk").unwrap()).unwrap().write(b"hello", 0, false).unwrap();
    assert_eq!(nbdinfo_size(&nbd_uri(&server)), 16 * MIB);
    assert_eq!(nbdinfo_size(&nbds_uri(&server, &pki.client_dir)), 16 * MIB);
    // Without client verification, a client without a certificate is welcome over TLS.
    assert_eq!(nbdinfo_size(&nbds_uri(&server, &pki.anonymous_dir)), 16 * MIB);
    // Raw: without TLS everything works; STARTTLS is offered.
    let mut c = Raw::session(&server, "disk", Neg::default());
    assert_eq!(c.read(0, 5), b"hello");
    let mut c = Raw::haggling(&server);
    c.option(proto::OPT_STARTTLS, b"x");
    assert_eq!(c.opt_final()[0].kind, proto::REP_ERR_INVALID, "STARTTLS with data");
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply(), ack(proto::OPT_STARTTLS));
}

#[test]
fn tls_acceptor_reports_bad_files() {
    if !have("openssl") {
        return;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let dir = pki_dir.path();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, b"-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n").unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, b"").unwrap();
    let binary = dir.join("binary.pem");
    std::fs::write(&binary, pattern(4096, 3)).unwrap();
    let missing = dir.join("missing.pem");
    let other_key = dir.join("client-key.pem");
    let ok = cairn_nbd::tls_acceptor(&pki.server_cert, &pki.server_key, Some(&pki.ca_cert));
    assert!(ok.is_ok(), "the good files load");
    let cases: Vec<(&str, &Path, &Path, Option<&Path>)> = vec![
        ("missing certificate", &missing, &pki.server_key, None),
        ("missing key", &pki.server_cert, &missing, None),
        ("missing client CA", &pki.server_cert, &pki.server_key, Some(&missing)),
        ("garbage certificate", &garbage, &pki.server_key, None),
        ("empty certificate file", &empty, &pki.server_key, None),
        ("binary certificate file", &binary, &pki.server_key, None),
        ("empty key file", &pki.server_cert, &empty, None),
        ("certificate as key", &pki.server_cert, &pki.server_cert, None),
        ("key as certificate", &pki.server_key, &pki.server_key, None),
        ("garbage client CA", &pki.server_cert, &pki.server_key, Some(&garbage)),
        ("empty client CA", &pki.server_cert, &pki.server_key, Some(&empty)),
        ("key that does not match the certificate", &pki.server_cert, &other_key, None),
    ];
    for (what, cert, key, ca) in cases {
        match std::panic::catch_unwind(|| cairn_nbd::tls_acceptor(cert, key, ca)) {
            Ok(Ok(_)) => panic!("{what}: accepted"),
            Ok(Err(e)) => eprintln!("{what}: {e}"),
            Err(_) => panic!("{what}: tls_acceptor panicked"),
        }
    }
}

/// `count` requests of one kind at offset 0, with cookies 0, 1, …, as one buffer to send.
fn same_requests(count: u64, command: Command, length: u32) -> Vec<u8> {
    (0..count)
        .flat_map(|cookie| proto::encode_request(&Request { flags: 0, command, cookie, offset: 0, length }))
        .collect()
}
