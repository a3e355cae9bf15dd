use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn_store::{ModuleStore, PytorchStore, SafetensorsStore, TensorSnapshot};

use crate::ImportError;

/// One tensor of a checkpoint, not yet read: its name, the file holding it, and a lazy handle
/// that knows its dtype and shape.
#[derive(Clone)]
pub struct StoredTensor {
    pub key: String,
    pub file: PathBuf,
    pub snapshot: TensorSnapshot,
}

impl StoredTensor {
    pub fn shape(&self) -> Vec<usize> {
        self.snapshot.shape.to_vec()
    }

    pub fn dtype(&self) -> burn::tensor::DType {
        self.snapshot.dtype
    }

    /// Reads the data as stored (no dtype conversion).
    pub fn read(&self) -> Result<burn::tensor::TensorData, ImportError> {
        self.snapshot.to_data().map_err(|e| ImportError::Tensor {
            key: self.key.clone(),
            file: self.file.clone(),
            message: format!("cannot read data: {e:?}"),
        })
    }

    /// Reads the data as f32, whatever the stored float type (bf16, f16, f32, f64) or int type.
    pub fn read_f32(&self) -> Result<Vec<f32>, ImportError> {
        let data = self.read()?.convert_dtype(burn::tensor::DType::F32);
        data.into_vec::<f32>().map_err(|e| ImportError::Tensor {
            key: self.key.clone(),
            file: self.file.clone(),
            message: format!("cannot convert to f32: {e:?}"),
        })
    }

    /// Reads an integer tensor as i64.
    pub fn read_i64(&self) -> Result<Vec<i64>, ImportError> {
        let data = self.read()?.convert_dtype(burn::tensor::DType::I64);
        data.into_vec::<i64>().map_err(|e| ImportError::Tensor {
            key: self.key.clone(),
            file: self.file.clone(),
            message: format!("cannot convert to i64: {e:?}"),
        })
    }
}

/// The tensors of one checkpoint, possibly spread over several files (shards).
pub struct Checkpoint {
    /// What was opened: a directory or a single file.
    pub root: PathBuf,
    pub files: Vec<PathBuf>,
    pub tensors: BTreeMap<String, StoredTensor>,
}

/// File names a checkpoint directory is searched for, in order of preference.
const CANDIDATES: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "mm_projector.bin",
    "mm_projector.safetensors",
];

impl Checkpoint {
    /// Opens a checkpoint: a directory (its preferred weights file is picked), a single
    /// `.bin`/`.pt`/`.pth`/`.safetensors` file, or a sharded `*.index.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImportError> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            Self::find_in_dir(path)?
        } else if path.is_file() {
            path.to_path_buf()
        } else {
            return Err(ImportError::Io {
                path: path.to_path_buf(),
                message: "no such file or directory".into(),
            });
        };
        let files = if file.to_string_lossy().ends_with(".index.json") {
            shard_files(&file)?
        } else {
            vec![file]
        };
        let mut tensors: BTreeMap<String, StoredTensor> = BTreeMap::new();
        for file in &files {
            for (key, snapshot) in read_file(file)? {
                let stored = StoredTensor { key: key.clone(), file: file.clone(), snapshot };
                if let Some(previous) = tensors.insert(key.clone(), stored) {
                    return Err(ImportError::DuplicateKey {
                        key,
                        first: previous.file,
                        second: file.clone(),
                    });
                }
            }
        }
        Ok(Self { root: path.to_path_buf(), files, tensors })
    }

    /// The preferred weights file of a checkpoint directory, if it has one.
    pub fn find_in_dir(dir: &Path) -> Result<PathBuf, ImportError> {
        CANDIDATES
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| ImportError::NoCheckpoint {
                path: dir.to_path_buf(),
                looked_for: CANDIDATES.join(", "),
            })
    }

    pub fn get(&self, key: &str) -> Option<&StoredTensor> {
        self.tensors.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    /// A short description of where the tensors come from, for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!("{} ({} shards)", self.root.display(), many.len()),
        }
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

fn read_file(path: &Path) -> Result<Vec<(String, TensorSnapshot)>, ImportError> {
    let err = |message: String| ImportError::Read { path: path.to_path_buf(), message };
    let snapshots = if is_safetensors(path) {
        let mut store = SafetensorsStore::from_file(path).map_indices_contiguous(false);
        let all = store.get_all_snapshots().map_err(|e| err(e.to_string()))?;
        all.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    } else {
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        let all = store.get_all_snapshots().map_err(|e| err(e.to_string()))?;
        all.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    };
    Ok(snapshots)
}

/// The shard files named by an HF `*.index.json` (its `weight_map` values), in a stable order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| ImportError::Io { path: index.to_path_buf(), message: e.to_string() })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ImportError::Read { path: index.to_path_buf(), message: e.to_string() })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        ImportError::Read { path: index.to_path_buf(), message: "no `weight_map` object".into() }
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (key, file) in map {
        let name = file.as_str().ok_or_else(|| ImportError::Read {
            path: index.to_path_buf(),
            message: format!("`weight_map.{key}` is not a file name"),
        })?;
        let shard = dir.join(name);
        if !files.contains(&shard) {
            files.push(shard);
        }
    }
    files.sort();
    for shard in &files {
        if !shard.is_file() {
            return Err(ImportError::Io {
                path: shard.clone(),
                message: format!("shard named by {} is missing", index.display()),
            });
        }
    }
    Ok(files)
}
