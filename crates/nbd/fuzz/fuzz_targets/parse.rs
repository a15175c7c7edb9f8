//! Every pure parser over arbitrary bytes: none may panic, and what parses must re-encode to
//! the same bytes (requests) or stay within the payload's bounds (options).
#![no_main]

use cairn_nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 4 {
        0 => {
            if let Ok(header) = <[u8; proto::REQUEST_LEN]>::try_from(&rest[..rest.len().min(proto::REQUEST_LEN)]) {
                if let Ok(request) = proto::parse_request(&header) {
                    assert_eq!(proto::encode_request(&request), header);
                }
            }
        }
        1 => {
            if let Ok(header) = <[u8; proto::OPTION_HEADER_LEN]>::try_from(&rest[..rest.len().min(proto::OPTION_HEADER_LEN)]) {
                let _ = proto::parse_option_header(&header);
            }
        }
        2 => {
            if let Ok(flags) = <[u8; 4]>::try_from(&rest[..rest.len().min(4)]) {
                let _ = proto::parse_client_flags(flags);
            }
        }
        _ => {
            if rest.len() >= 4 {
                let option = u32::from_be_bytes(rest[..4].try_into().unwrap()) % 16;
                if let Ok(proto::ClientOption::MetaContext { queries, .. }) = proto::parse_option(option, &rest[4..]) {
                    assert!(queries.iter().map(|q| q.len() + 4).sum::<usize>() <= rest.len());
                }
            }
        }
    }
});
