//! tap_dump.rs: a one-file safetensors writer for dumping an engine's intermediate tensors
//! ("taps") under mlx_tinyllama's canonical names, so that
//!
//!     python -m mlx_tinyllama.trace compare --against dump.safetensors --model MODEL
//!
//! can tell where the engine first goes wrong. Copy this file into your crate (`mod tap_dump;`);
//! it uses only std and builds with Rust 1.63 (Debian's rustc) and later. Public domain / CC0.
//!
//! ```ignore
//! let mut d = tap_dump::TapDump::new();
//! d.set_tokens(&ids);                  // the prompt ids, BOS included if you feed one
//! d.set_position(0);                   // position of the first token row (decode: the step's)
//! d.set_dtype("float16");              // the precision the engine computed in (tolerances)
//! d.add_f32(&tap_dump::name(Some(3), "attn.q"), &q, &[n_heads, n_tokens, head_dim], tap_dump::DType::F16)?;
//! d.write("dump.safetensors")?;        // temp file + rename: readers never see half a file
//! ```
//!
//! Shapes drop the batch dimension: [T, hidden] for norms and residuals, [heads, T, head_dim]
//! for q/k/v, [heads, T, S] for scores and probabilities, [T, heads*head_dim] for attn.context.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Canonical stage names within a layer (mlx_tinyllama/stages.py), in forward order.
pub const LAYER_STAGES: [&str; 22] = [
    "attn_norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.k_rep",
    "attn.v_rep", "attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs",
    "attn.context", "attn.out", "resid_mid", "mlp_norm", "mlp.gate", "mlp.up", "mlp.act", "mlp.prod", "mlp.down", "out",
];
/// Stages outside the layers.
pub const GLOBAL_STAGES: [&str; 3] = ["embed", "final_norm", "logits"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn tag(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            _ => 2,
        }
    }
}

/// "layers.<layer>.<stage>", or "<stage>" for the global stages (layer None).
pub fn name(layer: Option<usize>, stage: &str) -> String {
    match layer {
        Some(i) => format!("layers.{}.{}", i, stage),
        None => stage.to_string(),
    }
}

struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Tensors and metadata collected in memory, written by `write` in one go.
pub struct TapDump {
    tensors: Vec<Tensor>,
    metadata: BTreeMap<String, String>,
    fused: Vec<(String, String)>, // (tensor name, its "fused" metadata entry as JSON)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl TapDump {
    pub fn new() -> TapDump {
        TapDump { tensors: Vec::new(), metadata: BTreeMap::new(), fused: Vec::new() }
    }

    /// Name a fused tensor: `name` holds `taps` side by side on its last axis, in this order (one
    /// matmul: q|k|v against a concatenated weight, gate|up), shaped [T, width]. layout: "concat"
    /// (one after the other), "grouped" (q/k/v per KV group: Megatron-LM's linear_qkv) or
    /// "interleaved" (the parts' columns alternate). Recorded in the "fused" metadata, which
    /// compare reads as --map entries.
    pub fn set_fused(&mut self, name: &str, taps: &[&str], layout: &str) -> io::Result<()> {
        let distinct = taps.iter().enumerate().all(|(i, t)| !t.is_empty() && !taps[..i].contains(t));
        if name.is_empty() || taps.len() < 2 || !distinct || !["concat", "grouped", "interleaved"].contains(&layout)
            || self.fused.iter().any(|(n, _)| n == name)
        {
            return Err(invalid(format!("fused {:?}: 2 or more distinct taps, a layout of concat, grouped or \
                                        interleaved, and a name given once ({:?}, {:?})", name, taps, layout)));
        }
        let list: Vec<String> = taps.iter().map(|t| json_str(t)).collect();
        let list = format!("[{}]", list.join(","));
        let entry = if layout == "concat" { list } else { format!("{{\"taps\":{},\"layout\":{}}}", list, json_str(layout)) };
        self.fused.push((name.to_string(), entry));
        let items: Vec<String> = self.fused.iter().map(|(n, e)| format!("{}:{}", json_str(n), e)).collect();
        let value = format!("{{{}}}", items.join(","));
        self.set_meta("fused", &value);
        Ok(())
    }

    pub fn set_meta(&mut self, key: &str, value: &str) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// "tokens": "[1, 529, ...]"
    pub fn set_tokens(&mut self, ids: &[u32]) {
        let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        self.set_meta("tokens", &format!("[{}]", parts.join(", ")));
    }

    /// "position": the position of the first token row.
    pub fn set_position(&mut self, position: u64) {
        self.set_meta("position", &position.to_string());
    }

    /// "dtype": the precision the engine computed in ("float32", "float16", "bfloat16").
    pub fn set_dtype(&mut self, dtype: &str) {
        self.set_meta("dtype", dtype);
    }

    fn push(&mut self, name: &str, dtype: DType, shape: &[usize], n: usize, bytes: Vec<u8>) -> io::Result<()> {
        let count: usize = shape.iter().product();
        if count != n {
            return Err(invalid(format!("{}: {} values for shape {:?}", name, n, shape)));
        }
        if name.is_empty() || self.tensors.iter().any(|t| t.name == name) {
            return Err(invalid(format!("tensor name {:?} is empty or already added", name)));
        }
        debug_assert_eq!(bytes.len(), count * dtype.size());
        self.tensors.push(Tensor { name: name.to_string(), dtype, shape: shape.to_vec(), bytes });
        Ok(())
    }

    /// Add a row-major f32 tensor, stored as `store_as` (rounded to nearest even).
    pub fn add_f32(&mut self, name: &str, data: &[f32], shape: &[usize], store_as: DType) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(data.len() * store_as.size());
        for &x in data {
            match store_as {
                DType::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                DType::F16 => bytes.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
                DType::BF16 => bytes.extend_from_slice(&f32_to_bf16(x).to_le_bytes()),
            }
        }
        self.push(name, store_as, shape, data.len(), bytes)
    }

    /// Add IEEE half (F16) or bfloat16 (BF16) values given as their bit patterns.
    pub fn add_bits16(&mut self, name: &str, bits: &[u16], shape: &[usize], dtype: DType) -> io::Result<()> {
        if dtype == DType::F32 {
            return Err(invalid("add_bits16 takes F16 or BF16".to_string()));
        }
        let mut bytes = Vec::with_capacity(bits.len() * 2);
        for &b in bits {
            bytes.extend_from_slice(&b.to_le_bytes());
        }
        self.push(name, dtype, shape, bits.len(), bytes)
    }

    /// The safetensors header (JSON, padded with spaces to a multiple of 8 bytes).
    fn header(&self) -> String {
        let mut h = String::from("{");
        let mut first = true;
        if !self.metadata.is_empty() {
            h.push_str("\"__metadata__\":{");
            let items: Vec<String> =
                self.metadata.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_str(v))).collect();
            h.push_str(&items.join(","));
            h.push('}');
            first = false;
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            if !first {
                h.push(',');
            }
            first = false;
            let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            h.push_str(&format!(
                "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                json_str(&t.name),
                t.dtype.tag(),
                dims.join(","),
                offset,
                offset + t.bytes.len()
            ));
            offset += t.bytes.len();
        }
        h.push('}');
        while h.len() % 8 != 0 {
            h.push(' ');
        }
        h
    }

    /// Write to `path`: first "PATH.tmp.PID", then renamed onto PATH.
    pub fn write<P: AsRef<Path>>(&self, path: P) -> io::Result<()> {
        let path = path.as_ref();
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let result = self.write_to(&tmp).and_then(|_| fs::rename(&tmp, path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_to(&self, path: &Path) -> io::Result<()> {
        let header = self.header();
        let mut f = io::BufWriter::new(fs::File::create(path)?);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        for t in &self.tensors {
            f.write_all(&t.bytes)?;
        }
        let file = f.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

impl Default for TapDump {
    fn default() -> TapDump {
        TapDump::new()
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// f32 -> bfloat16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// f32 -> IEEE half bits, round to nearest even (overflow to Inf, NaN stays NaN, subnormals kept).
pub fn f32_to_f16(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = ((u >> 16) & 0x8000) as u16;
    let exp = ((u >> 23) & 0xff) as i32;
    let mant = u & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let mut h = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        let halfway = 1u32 << (shift - 1);
        if rem > halfway || (rem == halfway && (h & 1) == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1) {
        h += 1; // a carry into the exponent is the right rounding
    }
    sign | h as u16
}
