//! Applying a checkpoint to a burn module: every parameter of the module is looked up through
//! the [`Layout`]'s name table, checked for shape, cast to the parameter's own dtype (checkpoints
//! are often bf16, models f32 or bf16) and written in; every stored tensor must be claimed or be
//! a known non-weight. All problems are gathered into one error.

use std::collections::BTreeSet;
use std::rc::Rc;

use burn::module::Module;
use burn::prelude::Backend;
use burn_store::{ModuleSnapshot, TensorSnapshot};

use crate::{Checkpoint, ImportError, Layout};

/// What a successful load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Number of parameter tensors written.
    pub loaded: usize,
    /// Number of scalars written.
    pub parameters: usize,
    /// Stored keys passed over as known non-weights (buffers, a tied head, the CLIP text tower).
    pub ignored: Vec<String>,
    /// Stored dtypes seen, e.g. `["BF16"]`.
    pub stored_dtypes: Vec<String>,
}

/// Loads `checkpoint` into `module`, reading it as `layout`. `has_lm_head` says whether the
/// module has its own (untied) output projection.
pub fn load_module<B: Backend, M: Module<B>>(
    mut module: M,
    checkpoint: &Checkpoint,
    layout: Layout,
    has_lm_head: bool,
) -> Result<(M, LoadReport), ImportError> {
    let targets = module.collect(None, None, false);
    let mut problems = Vec::new();
    let mut claimed = BTreeSet::new();
    let mut snapshots = Vec::with_capacity(targets.len());
    let mut report = LoadReport::default();
    let mut dtypes = BTreeSet::new();

    for target in &targets {
        let path = target.full_path();
        let candidates = layout.candidates(&path);
        let Some(stored) = candidates.iter().find_map(|k| checkpoint.get(k)) else {
            problems.push(format!(
                "missing: no tensor `{}` in {} (needed for parameter `{path}`, shape {:?})",
                candidates.join("` or `"),
                checkpoint.describe(),
                target.shape.to_vec(),
            ));
            continue;
        };
        claimed.insert(stored.key.clone());
        if stored.snapshot.shape != target.shape {
            problems.push(format!(
                "shape mismatch: `{}` in {} has shape {:?}, parameter `{path}` expects {:?}",
                stored.key,
                stored.file.display(),
                stored.shape(),
                target.shape.to_vec(),
            ));
            continue;
        }
        dtypes.insert(format!("{:?}", stored.dtype()));
        report.parameters += target.shape.num_elements();
        report.loaded += 1;
        let target_dtype = target.dtype;
        let source = stored.snapshot.clone_data_fn();
        let data_fn = Rc::new(move || source().map(|d| d.convert_dtype(target_dtype)));
        snapshots.push(TensorSnapshot::from_closure(
            data_fn,
            target_dtype,
            target.shape.clone(),
            target.path_stack.clone().unwrap_or_default(),
            target.container_stack.clone().unwrap_or_default(),
            target.tensor_id.unwrap_or_default(),
        ));
    }

    for (key, stored) in &checkpoint.tensors {
        if claimed.contains(key) {
            continue;
        }
        if layout.is_ignorable(key, has_lm_head) {
            report.ignored.push(key.clone());
        } else {
            problems.push(format!(
                "unexpected: `{key}` {:?} in {} matches no parameter of the model",
                stored.shape(),
                stored.file.display()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ImportError::Mismatch { problems });
    }

    let result = module.apply(snapshots, None, None, false);
    for error in &result.errors {
        problems.push(format!("{error} (from {})", checkpoint.describe()));
    }
    for (path, _) in &result.missing {
        problems.push(format!("parameter `{path}` was not written"));
    }
    if !problems.is_empty() {
        return Err(ImportError::Mismatch { problems });
    }
    report.stored_dtypes = dtypes.into_iter().collect();
    Ok((module, report))
}
