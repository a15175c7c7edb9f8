//! A whole server session fed arbitrary client bytes: the handshake, options and requests
//! against a real volume store on in-memory storage. The server must neither panic nor hang;
//! it answers or closes.
#![no_main]

use std::sync::Arc;

use cairn_nbd::{serve_connection, ServerConfig, VolumeExports};
use cairn_volume::storage::MemStorage;
use cairn_volume::{Store, StoreOptions};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Store::open(Arc::new(MemStorage::new()), StoreOptions::default()).unwrap();
    let volume = store.create_volume("disk", 1 << 20).unwrap();
    store.snapshot(volume.id, "snap").unwrap();
    let exports = Arc::new(VolumeExports::new(Arc::new(store)));
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(serve_connection(server, exports, ServerConfig::default()));
        let input = data.to_vec();
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let feed = async move {
            let _ = writer.write_all(&input).await;
            let _ = writer.shutdown().await;
        };
        let drain = async move {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink).await;
        };
        tokio::join!(feed, drain);
        session.await.unwrap();
    });
});
