//! Which CUDA stream a kernel launch goes to, seen through CUPTI's driver-API callbacks.
//!
//! cubecl 0.10 keeps its CUDA streams to itself, so a cuBLASLt product used to run on a stream
//! of its own, ordered against cubecl's by spinning flag kernels ([`crate::cublaslt`]): ~20 µs
//! of hand-off a product, and a spinning block on one SM that keeps a full-SM GEMM tile off it
//! (a full-size stage-2 step lost ~12 ms to the one and ~5 ms to the other,
//! `model-import/results/kernel-timeline-2026-12-06/`). CUPTI, NVIDIA's tracing interface
//! (`libcupti`, in the CUDA toolkit under `extras/CUPTI/lib64` and in the
//! `nvidia-cuda-cupti` wheels), calls a function of ours on entry to every `cuLaunchKernel`
//! with its arguments, the stream among them. [`launch_stream`] arms that callback around one
//! launch made on the calling thread (cubecl launches at once on its device thread) and
//! returns the launch's stream; the callback is off otherwise.
//!
//! The library is loaded on first use: `LLAVA_JP_CUPTI` (a path) if set, else `libcupti.so`,
//! `.so.13` or `.so.12` from the loader's path, else the usual toolkit places. Where none
//! loads, or another tool holds CUPTI's one subscription (a profiler), [`launch_stream`] says
//! why and callers keep their other route.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

/// CUPTI's `CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API`.
const DOMAIN_DRIVER_API: u32 = 1;
/// `CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel` and its per-thread-stream twin (same parameters).
const CBID_LAUNCH_KERNEL: [u32; 2] = [307, 442];
/// `CUpti_ApiCallbackSite::CUPTI_API_ENTER`.
const API_ENTER: u32 = 0;

/// `CUpti_CallbackData`'s leading fields (CUPTI's `cupti_callbacks.h`), as far as we read.
#[repr(C)]
struct CallbackData {
    callback_site: u32,
    function_name: *const std::ffi::c_char,
    function_params: *const c_void,
}

/// `cuLaunchKernel_params` (CUPTI's `generated_cuda_meta.h`): the launch's arguments.
#[repr(C)]
struct LaunchKernelParams {
    function: *mut c_void,
    grid: [u32; 3],
    block: [u32; 3],
    shared_mem_bytes: u32,
    stream: *mut c_void,
}

type Subscriber = *mut c_void;
type Callback = unsafe extern "C" fn(*mut c_void, u32, u32, *const c_void);

struct Cupti {
    /// Keeps the library mapped for the process (the function pointers below point into it).
    _library: libloading::Library,
    enable_callback: unsafe extern "C" fn(u32, Subscriber, u32, u32) -> u32,
    result_string: unsafe extern "C" fn(u32, *mut *const std::ffi::c_char) -> u32,
    subscriber: Subscriber,
}

// The subscriber handle is CUPTI's, valid for the process and usable from any thread.
unsafe impl Send for Cupti {}
unsafe impl Sync for Cupti {}

impl Cupti {
    fn error(&self, code: u32) -> String {
        let mut text: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: CUPTI writes a pointer to a static string (or leaves null on failure).
        if unsafe { (self.result_string)(code, &mut text) } == 0 && !text.is_null() {
            // SAFETY: a NUL-terminated static string from CUPTI.
            return unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned();
        }
        format!("CUPTI error {code}")
    }

    fn set_launch_callbacks(&self, on: bool) -> Result<(), String> {
        for cbid in CBID_LAUNCH_KERNEL {
            // SAFETY: a subscriber of ours and a valid (domain, id) pair.
            let code = unsafe { (self.enable_callback)(on as u32, self.subscriber, DOMAIN_DRIVER_API, cbid) };
            if code != 0 {
                return Err(format!("cuptiEnableCallback({on}, driver API, {cbid}): {}", self.error(code)));
            }
        }
        Ok(())
    }
}

thread_local! {
    /// Set while this thread waits for the stream of its own launch.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    /// The stream of the first `cuLaunchKernel` this thread made while armed.
    static SEEN: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Called by CUPTI on the launching thread. Reads only: a launch of another thread, or one not
/// asked for, passes untouched.
unsafe extern "C" fn on_driver_call(_: *mut c_void, domain: u32, cbid: u32, data: *const c_void) {
    if domain != DOMAIN_DRIVER_API || !CBID_LAUNCH_KERNEL.contains(&cbid) || data.is_null() || !ARMED.with(Cell::get) {
        return;
    }
    // SAFETY: for the driver API domain CUPTI passes a `CUpti_CallbackData`, whose parameters
    // for cuLaunchKernel(_ptsz) are `cuLaunchKernel_params`.
    let data = unsafe { &*(data as *const CallbackData) };
    if data.callback_site != API_ENTER || data.function_params.is_null() {
        return;
    }
    let params = unsafe { &*(data.function_params as *const LaunchKernelParams) };
    SEEN.with(|seen| {
        if seen.get().is_none() {
            seen.set(Some(params.stream as usize));
        }
    });
}

/// Where the library may be, in the order tried.
fn candidates() -> Vec<String> {
    if let Ok(path) = std::env::var("LLAVA_JP_CUPTI") {
        return vec![path];
    }
    let mut names: Vec<String> = ["libcupti.so", "libcupti.so.13", "libcupti.so.12"].iter().map(|s| s.to_string()).collect();
    for root in ["/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-12"] {
        for dir in ["extras/CUPTI/lib64", "targets/x86_64-linux/lib", "lib64"] {
            for name in ["libcupti.so", "libcupti.so.13", "libcupti.so.12"] {
                names.push(format!("{root}/{dir}/{name}"));
            }
        }
    }
    names
}

fn load() -> Result<Cupti, String> {
    let mut tried = Vec::new();
    let library = candidates()
        .into_iter()
        // SAFETY: loading CUPTI runs its initialisers, which only register with the driver.
        .find_map(|name| match unsafe { libloading::Library::new(&name) } {
            Ok(library) => Some(library),
            Err(e) => {
                tried.push(format!("{name} ({e})"));
                None
            }
        })
        .ok_or_else(|| format!("libcupti could not be loaded (set LLAVA_JP_CUPTI to its path); tried {}", tried.join(", ")))?;
    // SAFETY: the symbols have these C signatures in every CUPTI since 10.0.
    unsafe {
        let subscribe = *library
            .get::<unsafe extern "C" fn(*mut Subscriber, Callback, *mut c_void) -> u32>(b"cuptiSubscribe\0")
            .map_err(|e| format!("cuptiSubscribe: {e}"))?;
        let enable_callback = *library
            .get::<unsafe extern "C" fn(u32, Subscriber, u32, u32) -> u32>(b"cuptiEnableCallback\0")
            .map_err(|e| format!("cuptiEnableCallback: {e}"))?;
        let result_string = *library
            .get::<unsafe extern "C" fn(u32, *mut *const std::ffi::c_char) -> u32>(b"cuptiGetResultString\0")
            .map_err(|e| format!("cuptiGetResultString: {e}"))?;
        let mut subscriber: Subscriber = std::ptr::null_mut();
        let code = subscribe(&mut subscriber, on_driver_call, std::ptr::null_mut());
        let cupti = Cupti { _library: library, enable_callback, result_string, subscriber };
        if code != 0 {
            // CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED under a profiler, most often.
            return Err(format!("cuptiSubscribe: {}", cupti.error(code)));
        }
        Ok(cupti)
    }
}

fn cupti() -> Result<&'static Cupti, String> {
    static CUPTI: OnceLock<Result<Cupti, String>> = OnceLock::new();
    CUPTI.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// The CUDA stream (a `CUstream`, as an address) of the first kernel `launch` launches on this
/// thread. `launch` must make the driver call itself before it returns (not queue it for
/// another thread). One capture at a time in the process: the callback is armed per thread but
/// enabled globally, and turning it off must not cut another thread's capture short.
pub fn launch_stream(launch: impl FnOnce()) -> Result<usize, String> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let cupti = cupti()?;
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    /// Disarms this thread and turns the callback off however `launch` ends.
    struct Armed<'a>(&'a Cupti);
    impl Drop for Armed<'_> {
        fn drop(&mut self) {
            ARMED.with(|armed| armed.set(false));
            if let Err(e) = self.0.set_launch_callbacks(false) {
                eprintln!("CUPTI: turning the launch callback off: {e}");
            }
        }
    }
    SEEN.with(|seen| seen.set(None));
    cupti.set_launch_callbacks(true)?;
    let armed = Armed(cupti);
    ARMED.with(|armed| armed.set(true));
    launch();
    drop(armed);
    SEEN.with(Cell::take).ok_or_else(|| "CUPTI saw no cuLaunchKernel from this thread during the launch".to_string())
}
