//! Writes GGUF v3 files (the format [`super::gguf`] reads and llama.cpp loads), streaming
//! each tensor's bytes so that a file larger than memory can be made.

use super::gguf::Value;
use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Tensor data offsets are multiples of this (GGUF's default `general.alignment`).
const ALIGNMENT: usize = 32;

/// A tensor to write: its GGUF dims (fastest-varying first, i.e. `[cols, rows]`), its
/// ggml type id, and its size in bytes.
pub struct TensorDecl {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub bytes: usize,
}

/// Writes `metadata` and `tensors` to `path`; `fill(i, buf)` provides tensor `i`'s bytes
/// (`buf` is `tensors[i].bytes` long). `progress` is told of every tensor written.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorDecl],
    mut fill: impl FnMut(usize, &mut [u8]) -> Result<()>,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend(value_type(value)?.to_le_bytes());
        put_value(&mut header, value)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend(d.to_le_bytes());
        }
        header.extend(t.ggml_type.to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset += t.bytes.next_multiple_of(ALIGNMENT);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    let write_err = || format!("cannot write {}", path.display());
    out.write_all(&header).with_context(write_err)?;
    let mut buf = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        buf.clear();
        buf.resize(t.bytes, 0);
        fill(i, &mut buf)?;
        buf.resize(t.bytes.next_multiple_of(ALIGNMENT), 0);
        out.write_all(&buf).with_context(write_err)?;
        progress(i);
    }
    out.flush().with_context(write_err)
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// GGUF's type id of a value.
fn value_type(v: &Value) -> Result<u32> {
    Ok(match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    })
}

fn put_value(b: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.extend(x.to_le_bytes()),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_string(b, s),
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array is written as an empty array of strings.
            let ty = items.first().map_or(Ok(8), value_type)?;
            if items.iter().any(|i| value_type(i).ok() != Some(ty)) {
                bail!("a GGUF array holds values of one type only");
            }
            b.extend(ty.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(b, item)?;
            }
        }
    }
    Ok(())
}
