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
//! The library is loaded on first use: `LLAVA_JP_CUPTI` (a path) if set; else a CUPTI already in
//! the process; else `libcupti.so.<the driver's CUDA major>`, the other majors and `libcupti.so`,
//! from the loader's path, then from the toolkit's usual places. The callback subscription (CUPTI
//! allows one in a process) is held only during a capture. Where no library works, or another
//! tool holds the subscription (a profiler: the products then take the flag route, so a profile
//! shows that route), [`launch_stream`] says why and callers keep their other route.

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
/// `CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED`: another tool (a profiler) holds CUPTI's one
/// callback subscription.
const MULTIPLE_SUBSCRIBERS: u32 = 39;

/// The library and the entry points used. The callback subscription is taken only around a
/// capture, so that a profiler attached later is not locked out.
struct Cupti {
    /// Keeps the library mapped for the process (the function pointers below point into it).
    _library: libloading::Library,
    name: String,
    subscribe: unsafe extern "C" fn(*mut Subscriber, Callback, *mut c_void) -> u32,
    unsubscribe: unsafe extern "C" fn(Subscriber) -> u32,
    enable_callback: unsafe extern "C" fn(u32, Subscriber, u32, u32) -> u32,
    result_string: unsafe extern "C" fn(u32, *mut *const std::ffi::c_char) -> u32,
}

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

    /// A subscription for [`on_driver_call`], or why not (`MULTIPLE_SUBSCRIBERS`'s code kept).
    fn subscribe(&self) -> Result<Subscriber, (u32, String)> {
        let mut subscriber: Subscriber = std::ptr::null_mut();
        // SAFETY: a valid out pointer and a callback with CUPTI's signature.
        let code = unsafe { (self.subscribe)(&mut subscriber, on_driver_call, std::ptr::null_mut()) };
        match code {
            0 => Ok(subscriber),
            code => Err((code, format!("cuptiSubscribe ({}): {}", self.name, self.error(code)))),
        }
    }

    fn set_launch_callbacks(&self, subscriber: Subscriber, on: bool) -> Result<(), String> {
        for cbid in CBID_LAUNCH_KERNEL {
            // SAFETY: a live subscriber of ours and a valid (domain, id) pair.
            let code = unsafe { (self.enable_callback)(on as u32, subscriber, DOMAIN_DRIVER_API, cbid) };
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

/// Where the library may be, in the order tried: `LLAVA_JP_CUPTI` alone where set; else the
/// sonames of the driver's CUDA major version first (a CUPTI newer than the driver does not
/// work with it), then the others, from the loader's path, then from the toolkit's usual places.
fn candidates() -> Vec<String> {
    if let Ok(path) = std::env::var("LLAVA_JP_CUPTI") {
        return vec![path];
    }
    let mut driver = 0i32;
    // SAFETY: writes the driver's version (e.g. 13000) into `driver`.
    let major = match unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) } {
        cudarc::driver::sys::CUresult::CUDA_SUCCESS => driver / 1000,
        _ => 0,
    };
    let first = format!("libcupti.so.{major}");
    let others = ["libcupti.so.13", "libcupti.so.12", "libcupti.so"].into_iter().filter(|s| *s != first).map(String::from);
    let sonames: Vec<String> = std::iter::once(first.clone()).chain(others).collect();
    let mut names = sonames.clone();
    for root in ["/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-12"] {
        for dir in ["extras/CUPTI/lib64", "targets/x86_64-linux/lib", "lib64"] {
            names.extend(sonames.iter().map(|name| format!("{root}/{dir}/{name}")));
        }
    }
    names
}

/// A CUPTI already in the process (a tool's, loaded through `CUDA_INJECTION64_PATH`, say), so
/// that a second, different copy is not loaded beside it.
#[cfg(target_os = "linux")]
fn already_loaded() -> Option<(String, libloading::Library)> {
    // glibc's RTLD_NOLOAD: open only what is loaded already.
    const RTLD_NOLOAD: std::ffi::c_int = 4;
    ["libcupti.so.13", "libcupti.so.12", "libcupti.so"].into_iter().find_map(|name| {
        // SAFETY: opens nothing new; the library's initialisers have run already.
        unsafe { libloading::os::unix::Library::open(Some(name), RTLD_NOLOAD | libloading::os::unix::RTLD_NOW) }.ok().map(|l| (name.to_string(), l.into()))
    })
}

#[cfg(not(target_os = "linux"))]
fn already_loaded() -> Option<(String, libloading::Library)> {
    None
}

/// The entry points of one library, if it has them all.
fn entry_points(name: String, library: libloading::Library) -> Result<Cupti, String> {
    // SAFETY: the symbols have these C signatures in every CUPTI since 10.0.
    unsafe {
        Ok(Cupti {
            subscribe: *library.get(b"cuptiSubscribe\0").map_err(|e| format!("{name}: cuptiSubscribe: {e}"))?,
            unsubscribe: *library.get(b"cuptiUnsubscribe\0").map_err(|e| format!("{name}: cuptiUnsubscribe: {e}"))?,
            enable_callback: *library.get(b"cuptiEnableCallback\0").map_err(|e| format!("{name}: cuptiEnableCallback: {e}"))?,
            result_string: *library.get(b"cuptiGetResultString\0").map_err(|e| format!("{name}: cuptiGetResultString: {e}"))?,
            _library: library,
            name,
        })
    }
}

/// The first library that loads and takes a subscription (given back at once). A library that
/// loads but cannot subscribe (one newer than the driver, say) makes way for the next; another
/// tool holding the subscription ends the search.
fn load() -> Result<Cupti, String> {
    let mut tried = Vec::new();
    // A path given outright is the one used, whatever else is loaded.
    let preloaded = if std::env::var_os("LLAVA_JP_CUPTI").is_some() { None } else { already_loaded() };
    let found = preloaded.into_iter().chain(candidates().into_iter().filter_map(|name| {
        // SAFETY: loading CUPTI runs its initialisers, which only register with the driver.
        match unsafe { libloading::Library::new(&name) } {
            Ok(library) => Some((name, library)),
            Err(e) => {
                tried.push(format!("{name} ({e})"));
                None
            }
        }
    }));
    let mut reasons = Vec::new();
    for (name, library) in found {
        let cupti = match entry_points(name, library) {
            Ok(cupti) => cupti,
            Err(e) => {
                reasons.push(e);
                continue;
            }
        };
        match cupti.subscribe() {
            Ok(subscriber) => {
                // SAFETY: our live subscriber.
                unsafe { (cupti.unsubscribe)(subscriber) };
                return Ok(cupti);
            }
            Err((MULTIPLE_SUBSCRIBERS, why)) => return Err(why),
            Err((_, why)) => reasons.push(why),
        }
    }
    reasons.extend(tried);
    Err(format!("no usable libcupti (set LLAVA_JP_CUPTI to its path); tried {}", reasons.join(", ")))
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
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let subscriber = cupti.subscribe().map_err(|(_, why)| why)?;
    /// Disarms this thread, turns the callbacks off and gives the subscription back, however
    /// the capture ends.
    struct Capture<'a>(&'a Cupti, Subscriber);
    impl Drop for Capture<'_> {
        fn drop(&mut self) {
            ARMED.with(|armed| armed.set(false));
            if let Err(e) = self.0.set_launch_callbacks(self.1, false) {
                eprintln!("CUPTI: turning the launch callbacks off: {e}");
            }
            // SAFETY: our live subscriber, not used after this.
            unsafe { (self.0.unsubscribe)(self.1) };
        }
    }
    let capture = Capture(cupti, subscriber);
    SEEN.with(|seen| seen.set(None));
    cupti.set_launch_callbacks(subscriber, true)?;
    ARMED.with(|armed| armed.set(true));
    launch();
    drop(capture);
    match SEEN.with(Cell::take) {
        None => Err("CUPTI saw no cuLaunchKernel from this thread during the launch".to_string()),
        // The NULL, legacy and per-thread default streams: not a stream of cubecl's (it makes
        // non-blocking ones), and they would order a product differently.
        Some(stream @ 0..=2) => Err(format!("the launch went to CUDA's default stream ({stream})")),
        Some(stream) => Ok(stream),
    }
}
