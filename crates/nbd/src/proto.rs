//! The NBD wire protocol as pure functions over bytes: no I/O here, so every message can be
//! tested and fuzzed on its own. Names and values follow doc/proto.md of the
//! NetworkBlockDevice/nbd project; all integers are big-endian.

/// "NBDMAGIC", the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": starts the newstyle greeting and every client option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an option header (magic, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERROR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERROR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERROR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERROR_BIT | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERROR_BIT | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR_BIT | 9;

// Info types in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata contexts cairn serves: allocation (data, zero, hole), and QEMU's depth in
/// the backing chain (0 = unallocated, 1 = top layer, 2 = the one below, ...).
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Longest option payload the server reads; longer ones are skipped with NBD_REP_ERR_TOO_BIG.
/// Real options (an export name and a few context queries) are far smaller.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string the protocol allows (export names, queries).
pub const MAX_STRING_LEN: usize = 4096;

/// NBD error values sent in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// Violations of the protocol that end a connection (there is no reply that could carry them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("client flags {0:#x} include unknown bits")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle negotiation")]
    NotFixedNewstyle,
}

/// Why an option's payload is malformed; the server answers NBD_REP_ERR_INVALID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option payload ends early")]
    Truncated,
    #[error("option payload has {0} bytes left over")]
    TrailingBytes(usize),
    #[error("string longer than {MAX_STRING_LEN} bytes")]
    StringTooLong,
    #[error("string is not UTF-8")]
    NotUtf8,
}

/// The server's greeting: magic, IHAVEOPT and its handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client said in its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

/// Parses the client's 32-bit flags. Unknown bits must end the session (the client expects
/// something this server does not do); so must a client without fixed newstyle, since
/// cairn needs option haggling for everything beyond the export name.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, ProtocolError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(flags));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle);
    }
    Ok(ClientFlags { no_zeroes: flags & FLAG_C_NO_ZEROES != 0 })
}

/// An option header: which option, and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let magic = be_u64(&bytes[..8]);
    if magic != OPTION_MAGIC {
        return Err(ProtocolError::BadMagic { expected: OPTION_MAGIC, found: magic });
    }
    Ok(OptionHeader { option: be_u32(&bytes[8..12]), len: be_u32(&bytes[12..16]) })
}

/// A client option with its payload decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// NBD_OPT_INFO (`go: false`) or NBD_OPT_GO (`go: true`).
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT (`set: false`) or NBD_OPT_SET_META_CONTEXT (`set: true`).
    MetaContext {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
    Unknown(u32),
}

/// Decodes an option's payload. Options that take no payload ignore one, as the spec asks
/// servers to do for NBD_OPT_ABORT.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let mut r = Cursor { data, pos: 0 };
    let parsed = match option {
        OPT_EXPORT_NAME => return Ok(ClientOption::ExportName(to_string(data)?)),
        OPT_ABORT => return Ok(ClientOption::Abort),
        OPT_LIST => ClientOption::List,
        OPT_STARTTLS => ClientOption::StartTls,
        OPT_STRUCTURED_REPLY => ClientOption::StructuredReply,
        OPT_INFO | OPT_GO => {
            let name = r.string()?;
            let count = r.u16()?;
            let requests = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
            ClientOption::Info { go: option == OPT_GO, name, requests }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let name = r.string()?;
            let count = r.u32()?;
            // Each query needs at least its 4-byte length: a count beyond that is a lie.
            if count as usize > r.remaining() / 4 {
                return Err(OptionError::Truncated);
            }
            let queries = (0..count).map(|_| r.string()).collect::<Result<_, _>>()?;
            ClientOption::MetaContext { set: option == OPT_SET_META_CONTEXT, name, queries }
        }
        other => return Ok(ClientOption::Unknown(other)),
    };
    if r.remaining() > 0 {
        return Err(OptionError::TrailingBytes(r.remaining()));
    }
    Ok(parsed)
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply whose payload is a human-readable message.
pub fn option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    let message = truncate_utf8(message, MAX_STRING_LEN);
    option_reply(out, option, reply_type, message.as_bytes());
}

/// NBD_INFO_EXPORT payload: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload.
pub fn info_text(info: u16, text: &str) -> Vec<u8> {
    let mut d = info.to_be_bytes().to_vec();
    d.extend_from_slice(truncate_utf8(text, MAX_STRING_LEN).as_bytes());
    d
}

/// NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [minimum, preferred, maximum] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// NBD_REP_SERVER payload for NBD_OPT_LIST: a name and a description.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(truncate_utf8(description, MAX_STRING_LEN).as_bytes());
    d
}

/// NBD_REP_META_CONTEXT payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// The reply that ends NBD_OPT_EXPORT_NAME: size, flags and, for old clients, 124 zeros.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = size.to_be_bytes().to_vec();
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.extend_from_slice(&[0u8; 124]);
    }
    d
}

/// Transmission commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }
}

/// A transmission request header. A write's payload (`length` bytes) follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a request header. A wrong magic means the stream is out of step: the connection
/// cannot continue.
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ProtocolError> {
    let magic = be_u32(&bytes[..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic { expected: REQUEST_MAGIC.into(), found: magic.into() });
    }
    Ok(Request {
        flags: be_u16(&bytes[4..6]),
        command: Command::from_wire(be_u16(&bytes[6..8])),
        cookie: be_u64(&bytes[8..16]),
        offset: be_u64(&bytes[16..24]),
        length: be_u32(&bytes[24..28]),
    })
}

/// Encodes a request header (for tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.command.to_wire().to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..28].copy_from_slice(&r.length.to_be_bytes());
    out
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Appends a simple reply header (a successful read's data follows it).
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: Option<ErrorCode>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&(error.map_or(0, |e| e as u32)).to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(out: &mut Vec<u8>, done: bool, reply_type: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&(if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the header of an OFFSET_DATA chunk; the caller appends `data_len` bytes of data.
pub fn chunk_offset_data(out: &mut Vec<u8>, done: bool, cookie: u64, offset: u64, data_len: u32) {
    chunk_header(out, done, REPLY_TYPE_OFFSET_DATA, cookie, data_len + 8);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an OFFSET_HOLE chunk: `len` bytes of zeros at `offset`, sent without the zeros.
pub fn chunk_offset_hole(out: &mut Vec<u8>, done: bool, cookie: u64, offset: u64, len: u32) {
    chunk_header(out, done, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a BLOCK_STATUS chunk: (length, flags) descriptors for one metadata context.
pub fn chunk_block_status(out: &mut Vec<u8>, done: bool, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    chunk_header(out, done, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * extents.len() as u32);
    out.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// Appends a final ERROR chunk with a message for people.
pub fn chunk_error(out: &mut Vec<u8>, cookie: u64, error: ErrorCode, message: &str) {
    let message = truncate_utf8(message, MAX_STRING_LEN);
    chunk_header(out, true, REPLY_TYPE_ERROR, cookie, 6 + message.len() as u32);
    out.extend_from_slice(&(error as u32).to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends the final NONE chunk that ends a reply whose other chunks did not say DONE.
pub fn chunk_done(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, true, REPLY_TYPE_NONE, cookie, 0);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("two bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("four bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("eight bytes"))
}

fn to_string(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionError::StringTooLong);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionError::NotUtf8)
}

/// Reads big-endian fields from an option payload, failing on truncation instead of panicking.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], OptionError> {
        if n > self.remaining() {
            return Err(OptionError::Truncated);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(be_u16)
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(be_u32)
    }

    /// A 32-bit length followed by that many bytes of UTF-8.
    fn string(&mut self) -> Result<String, OptionError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(OptionError::StringTooLong);
        }
        to_string(self.take(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn string_field(s: &str) -> Vec<u8> {
        let mut d = (s.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(s.as_bytes());
        d
    }

    #[test]
    fn greeting_is_the_fixed_newstyle_preamble() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(g[16..], [0, 3]);
    }

    #[test]
    fn client_flags_need_fixed_newstyle_and_no_unknown_bits() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(ClientFlags { no_zeroes: true }));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(ClientFlags { no_zeroes: false }));
        assert_eq!(parse_client_flags([0, 0, 0, 0]), Err(ProtocolError::NotFixedNewstyle));
        assert_eq!(parse_client_flags([0, 0, 0, 5]), Err(ProtocolError::UnknownClientFlags(5)));
    }

    #[test]
    fn go_option_decodes_name_and_info_requests() {
        let mut d = string_field("disk@snap");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_option(OPT_GO, &d),
            Ok(ClientOption::Info { go: true, name: "disk@snap".into(), requests: vec![3, 1] })
        );
        assert_eq!(parse_option(OPT_GO, &d[..d.len() - 1]), Err(OptionError::Truncated));
        d.push(0);
        assert_eq!(parse_option(OPT_GO, &d), Err(OptionError::TrailingBytes(1)));
    }

    #[test]
    fn meta_context_option_decodes_queries() {
        let mut d = string_field("disk");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend(string_field("base:allocation"));
        d.extend(string_field("qemu:dirty-bitmap:x"));
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &d),
            Ok(ClientOption::MetaContext {
                set: true,
                name: "disk".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
            })
        );
        // A query count far beyond the payload is rejected before anything is allocated.
        let mut lying = string_field("disk");
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_option(OPT_LIST_META_CONTEXT, &lying), Err(OptionError::Truncated));
    }

    #[test]
    fn export_names_must_be_utf8_and_short() {
        assert_eq!(parse_option(OPT_EXPORT_NAME, b"disk"), Ok(ClientOption::ExportName("disk".into())));
        assert_eq!(parse_option(OPT_EXPORT_NAME, &[0xff]), Err(OptionError::NotUtf8));
        assert_eq!(parse_option(OPT_EXPORT_NAME, &vec![b'a'; 5000]), Err(OptionError::StringTooLong));
        assert_eq!(parse_option(99, b"whatever"), Ok(ClientOption::Unknown(99)));
        assert_eq!(parse_option(OPT_ABORT, b"ignored"), Ok(ClientOption::Abort));
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let mut out = Vec::new();
        simple_reply(&mut out, 0x1122, Some(ErrorCode::Inval));
        assert_eq!(out, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0x11, 0x22]);
        out.clear();
        chunk_offset_hole(&mut out, true, 7, 4096, 512);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 12);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 1, 0, 2]);
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..28], &4096u64.to_be_bytes());
        out.clear();
        chunk_error(&mut out, 7, ErrorCode::Io, "boom");
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[20..24], &5u32.to_be_bytes());
        assert_eq!(&out[24..26], &4u16.to_be_bytes());
        assert_eq!(&out[26..], b"boom");
        out.clear();
        option_reply(&mut out, OPT_GO, REP_INFO, &info_export(1 << 30, FLAG_HAS_FLAGS));
        assert_eq!(&out[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let s = "é".repeat(MAX_STRING_LEN);
        let t = truncate_utf8(&s, MAX_STRING_LEN + 1);
        assert_eq!(t.len(), MAX_STRING_LEN);
    }

    proptest! {
        #[test]
        fn requests_round_trip(flags: u16, cmd: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command: Command::from_wire(cmd), cookie, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        }

        #[test]
        fn option_parsing_never_panics(option in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_option(option, &data);
        }

        #[test]
        fn request_parsing_rejects_any_other_magic(bytes in proptest::array::uniform28(any::<u8>())) {
            let parsed = parse_request(&bytes);
            prop_assert_eq!(parsed.is_ok(), bytes[..4] == REQUEST_MAGIC.to_be_bytes());
        }
    }
}
