//! Choosing a burn backend and float type at run time. Code that runs on any backend is written
//! once as a [`BackendJob`] and dispatched here.

use std::fmt;
use std::str::FromStr;

use burn::prelude::{Backend, Tensor, TensorData};

/// Calls `$m!` with the autodiff CUDA backends this crate trains on, as `inner, strategy` pairs
/// (`Cuda<f32>` etc. and `NoCheckpointing` must be in scope where it expands): the ones
/// [`dispatch_autodiff`] and the tests use, which the CUDA-only paths (cuBLASLt products, flash
/// attention) recognise by type. One list, so that a backend added to training gets both. burn's
/// checkpointing strategies are not among them: recomputation is `crate::train::micro_batch`'s.
#[cfg(feature = "cuda")]
macro_rules! autodiff_cuda_backends {
    ($m:ident) => {
        $m!(Cuda<f32>, NoCheckpointing; Cuda<bf16>, NoCheckpointing; Cuda<f16>, NoCheckpointing)
    };
}
#[cfg(feature = "cuda")]
pub(crate) use autodiff_cuda_backends;

/// `value` as a `U` when `T` is `U` (for backend-generic code that takes a path of one
/// backend's own).
pub(crate) fn downcast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let boxed: Box<dyn std::any::Any> = Box::new(value);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(back) => Err(*back.downcast::<T>().expect("a value downcast to its own type")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// burn-flex: the CPU backend (SIMD, threads).
    Flex,
    /// wgpu: Vulkan, Metal, DX12 (lavapipe on a CPU-only Linux machine).
    Wgpu,
    /// CUDA through cubecl.
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flex" | "cpu" => Ok(Self::Flex),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(format!("unknown backend `{s}`: expected flex, wgpu or cuda")),
        }
    }
}

impl FromStr for FloatType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype `{s}`: expected f32, f16 or bf16")),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}

impl fmt::Display for FloatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Work that runs on whichever backend is chosen.
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Runs `job` on `backend` with float type `dtype`, or says why that pair is not available in
/// this build or on this kind of backend.
pub fn dispatch<J: BackendJob>(backend: BackendKind, dtype: FloatType, job: J) -> Result<J::Output, String> {
    #[allow(unused_imports)]
    use burn::tensor::{bf16, f16};
    #[allow(unused_variables)]
    let unsupported = || -> Result<J::Output, String> {
        Err(format!(
            "dtype {dtype} is not supported on the {backend} backend{}",
            match backend {
                BackendKind::Wgpu => " (WGSL/Vulkan have no bf16 arithmetic: use f32 or f16)",
                _ => "",
            }
        ))
    };
    #[allow(unused_variables)]
    let not_built = |feature: &str| -> Result<J::Output, String> {
        Err(format!("this binary was built without the `{feature}` feature, so the {backend} backend is unavailable"))
    };
    match backend {
        BackendKind::Flex => {
            #[cfg(feature = "flex")]
            {
                use burn::backend::flex::FlexDevice;
                use burn::tensor::DType;
                // Flex picks its float type per device, once, before the first tensor.
                let float = match dtype {
                    FloatType::F32 => DType::F32,
                    FloatType::F16 => DType::F16,
                    FloatType::Bf16 => DType::BF16,
                };
                if float != DType::F32 {
                    burn::tensor::set_default_dtypes::<burn::backend::Flex>(&FlexDevice, float, DType::I32)
                        .map_err(|e| format!("cannot use {dtype} on the flex backend: {e:?}"))?;
                }
                Ok(job.run::<burn::backend::Flex>(FlexDevice))
            }
            #[cfg(not(feature = "flex"))]
            {
                let _ = (job, unsupported);
                not_built("flex")
            }
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::wgpu::WgpuDevice;
                match dtype {
                    FloatType::F32 => Ok(job.run::<burn::backend::Wgpu<f32>>(WgpuDevice::default())),
                    FloatType::F16 => Ok(job.run::<burn::backend::Wgpu<f16>>(WgpuDevice::default())),
                    FloatType::Bf16 => unsupported(),
                }
            }
            #[cfg(not(feature = "wgpu"))]
            {
                let _ = (job, unsupported);
                not_built("wgpu")
            }
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                use burn::backend::cuda::CudaDevice;
                cache_cuda_kernels();
                let device = CudaDevice::default();
                match dtype {
                    FloatType::F32 => Ok(job.run::<burn::backend::Cuda<f32>>(device)),
                    FloatType::F16 => Ok(job.run::<burn::backend::Cuda<f16>>(device)),
                    FloatType::Bf16 => Ok(job.run::<burn::backend::Cuda<bf16>>(device)),
                }
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (job, unsupported);
                not_built("cuda")
            }
        }
    }
}

/// Work that needs gradients: runs on the autodiff version of the chosen backend, with f32
/// parameters (mixed precision casts inside the model, see `model::nn::autocast`), on one or
/// more devices of it (data parallelism).
pub trait AutodiffJob {
    type Output;
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output;
}

/// Device memory held by a GPU backend's allocator, in MB (2^20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceMemory {
    /// Reserved from the driver (pages and persistent allocations, used or not).
    pub reserved: f64,
    /// Taken by live tensors.
    pub in_use: f64,
}

/// What cubecl's allocator holds on `device` when it is a CUDA device; `None` elsewhere.
pub fn device_memory<D: 'static>(device: &D) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Some(cuda) = (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>() {
        use burn_cubecl::cubecl::{cuda::CudaRuntime, Runtime};
        let usage = CudaRuntime::client(cuda).memory_usage().ok()?;
        let mb = |bytes: u64| bytes as f64 / 1048576.0;
        return Some(DeviceMemory { reserved: mb(usage.bytes_reserved), in_use: mb(usage.bytes_in_use) });
    }
    let _ = device;
    None
}

/// Has glibc serve large host buffers from its heap and keep them for reuse, instead of mapping
/// fresh pages for each one past 32 MiB and unmapping them on free. Every batch's pixels (43 MB
/// at stage 1) are copied into a new vector on their way to the device (cubecl's `create`), and
/// touching that many new pages costs the copy ~34 ms against ~9 from reused memory (a C
/// measurement of a 43 MB allocate-and-copy on the development machine). Called once, at the
/// start of the process, before other threads allocate.
pub fn keep_large_host_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only sets two of glibc's allocation thresholds (allocations up to
        // 1 GiB from the heap; up to 1 GiB of free heap kept); it takes and returns plain ints.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// `[images, 3, size, size]` pixels (`images * 3 * size * size` values) on `device`, in its
/// float dtype: [`upload_pixels_flat`], then [`shape_pixels`].
pub fn upload_pixels<B: Backend>(pixels: Vec<f32>, images: usize, size: usize, device: &B::Device) -> Tensor<B, 4> {
    shape_pixels(upload_pixels_flat::<B>(pixels, images, size, device), images, size)
}

/// The first half of [`upload_pixels`]: the values sent to `device` as they are, flat and in
/// f32 (burn would convert a host buffer to a bf16 backend's dtype element by element on the
/// calling thread; the cast is done on the device instead).
///
/// On CUDA this costs stage 1 30-50 ms a batch (32 images, 43 MB): cubecl's `create` copies
/// the bytes into a fresh pageable vector on the calling thread and writes from it on its
/// device thread (`model-import/results/kernel-variants-2026-12-05/`). The trainer therefore
/// calls it from a thread of its own, a step ahead (`crate::train::device_batches`), where the
/// transfer runs on that thread's stream while the device works through the current step.
pub fn upload_pixels_flat<B: Backend>(pixels: Vec<f32>, images: usize, size: usize, device: &B::Device) -> Tensor<B, 1> {
    let len = pixels.len();
    assert_eq!(len, images * 3 * size * size, "pixels: {len} values for {images} images of 3 x {size} x {size}");
    Tensor::<B, 1>::from_data(TensorData::new(pixels, [len]), (device, burn::tensor::DType::F32))
}

/// The second half of [`upload_pixels`]: flat f32 pixels as `[images, 3, size, size]` in the
/// device's float dtype.
pub fn shape_pixels<B: Backend>(flat: Tensor<B, 1>, images: usize, size: usize) -> Tensor<B, 4> {
    let float_dtype = burn::tensor::get_device_settings::<B>(&flat.device()).float_dtype;
    flat.reshape([images, 3, size, size]).cast(float_dtype)
}

/// `LLAVA_JP_CUDA_PROFILE_STEPS=A-B`: CUDA's profiler API records training steps A to B
/// (1-based) only, so that Nsight Compute or Systems started with `--profile-from-start off`
/// sees steady steps, not the first ones' compilation and autotuning. Called at the start of
/// each step with its number; a step's kernels are those queued from its start to the next's.
pub fn cuda_profile_step<D: 'static>(device: &D, step: u64) {
    #[cfg(feature = "cuda")]
    if let Some(cuda) = (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>() {
        static RANGE: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
        let range = RANGE.get_or_init(|| {
            let value = std::env::var("LLAVA_JP_CUDA_PROFILE_STEPS").ok()?;
            let parsed = value.split_once('-').and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
            match parsed {
                Some((first, last)) if first >= 1 && first <= last => Some((first, last)),
                _ => panic!("LLAVA_JP_CUDA_PROFILE_STEPS={value:?}: expected FIRST-LAST, training steps counted from 1 (e.g. 3-4)"),
            }
        });
        let Some((first, last)) = *range else { return };
        if step != first && step != last + 1 {
            return;
        }
        let result = cudarc::driver::CudaContext::new(cuda.index).and_then(|context| {
            context.bind_to_thread()?;
            if step == first { cudarc::driver::profiler_start() } else { cudarc::driver::profiler_stop() }
        });
        if let Err(e) = result {
            eprintln!("warning: LLAVA_JP_CUDA_PROFILE_STEPS: the CUDA profiler API failed at step {step}: {e}");
        }
    }
    let _ = (device, step);
}

/// Where compiled CUDA kernels are kept between runs: `LLAVA_JP_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/llava-jp/cubecl` or `~/.cache/llava-jp/cubecl`.
#[cfg(feature = "cuda")]
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("LLAVA_JP_KERNEL_CACHE") {
        return Some(dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(std::path::PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    Some(base.join("llava-jp").join("cubecl"))
}

/// cubecl compiles every CUDA kernel through NVRTC on first use and, unless told where, keeps
/// nothing on disk, so every run paid that again (minutes for a training step's kernels). This
/// points its compilation cache at [`kernel_cache_dir`] before CUDA is first used, unless a
/// `cubecl.toml` / `burn.toml` already chose one. Autotune results, which cubecl keeps under the
/// nearest Cargo project's `target/` by default (so a run from elsewhere retunes), go there too.
#[cfg(feature = "cuda")]
pub fn cache_cuda_kernels() {
    use burn_cubecl::cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut state = CubeClRuntimeConfig::storage().lock();
        if state.is_some() {
            return; // already read by an earlier CUDA or wgpu use: too late to change
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = kernel_cache_dir().map(CacheConfig::File);
        }
        if let (CacheConfig::Target, Some(dir)) = (&config.autotune.cache, kernel_cache_dir()) {
            config.autotune.cache = CacheConfig::File(dir.join("autotune"));
        }
        *state = Some(std::sync::Arc::new(config));
    });
}

/// Runs `job` on the autodiff backend over `backend`, on its first `num_devices` devices (the
/// GPUs 0.. on CUDA and wgpu; the one CPU device, shared, on flex). Gradient checkpointing
/// is the trainer's own (`crate::train::micro_batch`), on any of them.
pub fn dispatch_autodiff<J: AutodiffJob>(backend: BackendKind, num_devices: usize, job: J) -> Result<J::Output, String> {
    #[allow(unused_variables)]
    let not_built = |feature: &str| -> Result<J::Output, String> {
        Err(format!("this binary was built without the `{feature}` feature, so the {backend} backend is unavailable"))
    };
    if num_devices == 0 {
        return Err("num_devices = 0: at least one device is needed".into());
    }
    use burn::backend::Autodiff;
    #[cfg(feature = "flex")]
    let flex = || vec![burn::backend::flex::FlexDevice; num_devices];
    #[cfg(feature = "wgpu")]
    let wgpu = || -> Vec<burn::backend::wgpu::WgpuDevice> {
        use burn::backend::wgpu::WgpuDevice;
        if num_devices == 1 {
            vec![WgpuDevice::default()]
        } else {
            (0..num_devices).map(WgpuDevice::DiscreteGpu).collect()
        }
    };
    #[cfg(feature = "cuda")]
    let cuda = || {
        cache_cuda_kernels();
        (0..num_devices).map(burn::backend::cuda::CudaDevice::new).collect::<Vec<_>>()
    };
    match backend {
        #[cfg(feature = "flex")]
        BackendKind::Flex => Ok(job.run::<Autodiff<burn::backend::Flex>>(flex())),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(job.run::<Autodiff<burn::backend::Wgpu<f32>>>(wgpu())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(job.run::<Autodiff<burn::backend::Cuda<f32>>>(cuda())),
        #[allow(unreachable_patterns)]
        other => {
            let _ = job;
            not_built(&other.to_string())
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    /// The flat upload shaped on the device keeps every value in its place (image, channel,
    /// row, column), and a count that does not fit the shape is refused with the shape named.
    #[test]
    fn pixels_upload_flat_and_keep_their_places() {
        let device = burn::backend::flex::FlexDevice;
        let (images, size) = (2, 3);
        let pixels: Vec<f32> = (0..images * 3 * size * size).map(|i| i as f32 * 0.5 - 3.0).collect();
        let tensor = upload_pixels::<burn::backend::Flex>(pixels.clone(), images, size, &device);
        assert_eq!(tensor.dims(), [images, 3, size, size]);
        // Image 1, channel 2, row 1, column 0.
        let one: f32 = tensor.clone().slice([1..2, 2..3, 1..2, 0..1]).into_scalar();
        assert_eq!(one, pixels[((1 * 3 + 2) * size + 1) * size]);
        assert_eq!(tensor.into_data().to_vec::<f32>().unwrap(), pixels);
        let short = std::panic::catch_unwind(|| upload_pixels::<burn::backend::Flex>(vec![0.0; 5], 1, size, &device));
        let message = short.expect_err("5 values are not one 3 x 3 x 3 image");
        let message = message.downcast_ref::<String>().expect("a formatted message");
        assert!(message.contains("5 values for 1 images of 3 x 3 x 3"), "{message}");
    }
}
