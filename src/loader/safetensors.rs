//! Safetensors files (one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`), memory-mapped and read in slices.

use super::TensorSource;
use crate::kernels::Storage;
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

struct Tensor {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte offset of the first element within the mapped file.
    start: usize,
}

pub struct SafetensorsSource {
    maps: Vec<Mmap>,
    tensors: HashMap<String, Tensor>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no `weight_map` object", index.display()))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            files.sort();
            files.dedup();
            files
        } else if single.exists() {
            vec!["model.safetensors".to_owned()]
        } else {
            bail!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            );
        };
        let mut source = SafetensorsSource {
            maps: vec![],
            tensors: HashMap::new(),
        };
        for name in files {
            if name.contains('/') || name.contains("..") {
                bail!(
                    "{} names a file outside the model folder: {name}",
                    index.display()
                );
            }
            source
                .add_file(&dir.join(&name))
                .with_context(|| format!("in {}", dir.join(&name).display()))?;
        }
        Ok(source)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).context("cannot open the weights file")?;
        // SAFETY: the file is only read; tpserve does not modify model files while serving.
        let map = unsafe { Mmap::map(&file) }.context("cannot memory-map the weights file")?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| anyhow!("not a valid safetensors file: {e}"))?;
        let data_start = 8 + header_len;
        for (name, info) in metadata.tensors() {
            let (begin, end) = info.data_offsets;
            let expected = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
            if end - begin != expected || data_start + end > map.len() {
                bail!("tensor `{name}` has a data range that does not fit its shape or the file");
            }
            self.tensors.insert(
                name,
                Tensor {
                    file: self.maps.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + begin,
                },
            );
        }
        self.maps.push(map);
        Ok(())
    }
}

impl TensorSource for SafetensorsSource {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }

    fn slice_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<usize> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("the model file has no tensor `{name}`"))?;
        Ok(rows * cols * t.dtype.bitsize() / 8)
    }

    fn read_block(&self, name: &str, rows: Range<usize>, cols: Range<usize>) -> Result<Storage> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("the model file has no tensor `{name}`"))?;
        // A 1-D tensor reads as one row.
        let (_, n_cols) = super::check_slice(name, &t.shape, &rows, &cols)?;
        let elem = t.dtype.bitsize() / 8;
        let map = &self.maps[t.file];
        let mut bytes = Vec::with_capacity(rows.len() * cols.len() * elem);
        for r in rows {
            let at = t.start + (r * n_cols + cols.start) * elem;
            bytes.extend_from_slice(&map[at..at + cols.len() * elem]);
        }
        Ok(match t.dtype {
            Dtype::F32 => Storage::F32(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)),
            Dtype::BF16 => Storage::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(&bytes)),
            Dtype::F16 => Storage::F16(bytemuck::pod_collect_to_vec::<u8, f16>(&bytes)),
            other => bail!("tensor `{name}` has dtype {other:?}; tpserve reads F32, BF16 and F16"),
        })
    }
}
