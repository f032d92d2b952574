//! raw_dump: the tap_dump.rs example. Turns raw float32 buffers into a safetensors dump under
//! canonical tap names, the way an engine would call the module at each stage.
//!
//!     rustc --edition 2018 -O -o raw_dump kit/examples/raw_dump.rs
//!     ./raw_dump MANIFEST DATA OUT.safetensors f32|f16|bf16 TOKENS POSITION
//!
//! MANIFEST: one line per tensor, "NAME NDIM D0 D1 ...", in the order of DATA, which holds the
//! tensors' float32 values back to back (little-endian, row-major), or "@fused NAME LAYOUT
//! TAP1,TAP2,..." naming a fused tensor (set_fused). TOKENS: "1,529,..."

#[path = "../tap_dump.rs"]
mod tap_dump;

use std::env;
use std::fs;
use std::process;

fn fail(msg: &str) -> ! {
    eprintln!("error: {}", msg);
    process::exit(2)
}

fn main() {
    let args: Vec<String> = env::args().collect();
    if args.len() != 7 {
        fail("usage: raw_dump MANIFEST DATA OUT f32|f16|bf16 TOKENS POSITION");
    }
    let store = match args[4].as_str() {
        "f32" => tap_dump::DType::F32,
        "f16" => tap_dump::DType::F16,
        "bf16" => tap_dump::DType::BF16,
        _ => fail("dtype must be f32, f16 or bf16"),
    };
    let manifest = fs::read_to_string(&args[1]).unwrap_or_else(|_| fail("cannot read MANIFEST"));
    let data = fs::read(&args[2]).unwrap_or_else(|_| fail("cannot read DATA"));
    let ids: Vec<u32> = args[5]
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse().unwrap_or_else(|_| fail("bad TOKENS")))
        .collect();
    let position: u64 = args[6].parse().unwrap_or_else(|_| fail("bad POSITION"));

    let mut d = tap_dump::TapDump::new();
    d.set_tokens(&ids);
    d.set_position(position);
    d.set_dtype(match store {
        tap_dump::DType::F32 => "float32",
        tap_dump::DType::F16 => "float16",
        tap_dump::DType::BF16 => "bfloat16",
    });
    d.set_meta("engine", "kit/examples/raw_dump.rs");
    let mut at = 0usize;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields[0] == "@fused" {
            // "@fused NAME LAYOUT TAP1,TAP2,...": NAME holds those taps side by side
            if fields.len() != 4 {
                fail("bad @fused line");
            }
            let taps: Vec<&str> = fields[3].split(',').collect();
            if let Err(e) = d.set_fused(fields[1], &taps, fields[2]) {
                fail(&e.to_string());
            }
            continue;
        }
        let ndim: usize = fields.get(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| fail("bad NDIM"));
        if fields.len() != 2 + ndim {
            fail("bad shape in MANIFEST");
        }
        let shape: Vec<usize> =
            fields[2..].iter().map(|s| s.parse().unwrap_or_else(|_| fail("bad shape in MANIFEST"))).collect();
        let count: usize = shape.iter().product();
        if at + 4 * count > data.len() {
            fail("DATA is shorter than MANIFEST says");
        }
        let values: Vec<f32> = data[at..at + 4 * count]
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at += 4 * count;
        if let Err(e) = d.add_f32(fields[0], &values, &shape, store) {
            fail(&e.to_string());
        }
    }
    if let Err(e) = d.write(&args[3]) {
        eprintln!("error: writing {}: {}", args[3], e);
        process::exit(1);
    }
}
