mod common;
use common::*;
use std::process::Command;

#[test]
fn qemu_img_round_trip() {
    if !have("qemu-img") {
        return;
    }
    let server = TestServer::start();
    server.store.create_volume("disk", 64 << 20).unwrap();
    let src = server.dir.path().join("src.raw");
    let mut data = pattern(64 << 20, 1);
    data[8 << 20..24 << 20].fill(0);
    write_file(&src, &data);
    let out = run(Command::new("qemu-img").args(["info", "--output=json", &server.uri("disk")]));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(server.uri("disk")));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(server.uri("disk")));
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &server.uri("disk")]));
    println!("{}", String::from_utf8_lossy(&out.stdout));
}
