//! Refuses to link a prebuilt RocksDB (`ROCKSDB_LIB_DIR`, see `scripts/rocksdb`) compiled from
//! another librocksdb-sys version than Cargo.lock names: its C API would not match the bindings
//! librocksdb-sys generates, and the mismatch would show only as a crash.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    println!("cargo:rerun-if-changed=Cargo.lock");
    let Some(dir) = std::env::var_os("ROCKSDB_LIB_DIR") else {
        return;
    };
    let stamp_file = Path::new(&dir).join("STAMP");
    println!("cargo:rerun-if-changed={}", stamp_file.display());
    let Ok(stamp) = std::fs::read_to_string(&stamp_file) else {
        // An archive the operator built: theirs to match.
        println!(
            "cargo:warning=ROCKSDB_LIB_DIR has no STAMP (not made by scripts/rocksdb); its \
             RocksDB version is not checked against Cargo.lock"
        );
        return;
    };
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut lines = lock.lines();
    let locked = std::iter::from_fn(|| lines.next())
        .skip_while(|l| *l != "name = \"librocksdb-sys\"")
        .nth(1)
        .and_then(|l| l.strip_prefix("version = \""))
        .and_then(|l| l.strip_suffix('"'));
    let Some(locked) = locked else {
        return;
    };
    let want = format!("librocksdb-sys {locked}");
    if stamp.trim() != want {
        panic!(
            "ROCKSDB_LIB_DIR {} holds RocksDB built for {}, but Cargo.lock names {want}: \
             run `eval \"$(scripts/rocksdb env)\"` (or build through scripts/cargo) to use or \
             build the matching one",
            Path::new(&dir).display(),
            stamp.trim()
        );
    }
}
