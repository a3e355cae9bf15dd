//! Matrix products on CUDA at llm-jp-1.3b's training and decoding shapes: burn's own GEMM
//! against the cuBLASLt route (`src/cublaslt.rs`, ordered on the device and by host waits), in
//! one run, with the largest difference between burn's product and each cuBLASLt one (all
//! accumulate in f32). Needs an NVIDIA GPU.
//!
//!     cargo bench --bench gemm [-- --dtype bf16 --iters 20]
//!
//! Prints one JSON line per shape and weight layout: TFLOP/s of each route and their ratio.
use std::time::Instant;

use burn::backend::cuda::CudaDevice;
use burn::backend::Cuda;
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use llava_jp::cublaslt::GemmRoute;
use llava_jp::model::nn::matmul;

type B = Cuda<f32>;

/// burn's product first (the reference), then cuBLASLt on cubecl's stream, ordered by the host,
/// and ordered by flag kernels.
const ROUTES: [GemmRoute; 4] = [GemmRoute::Burn, GemmRoute::CublasLt, GemmRoute::CublasLtHostOrdered, GemmRoute::CublasLtFlags];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args.get(i + 1).unwrap_or_else(|| panic!("{flag} needs a value")).clone());
    let dtype = match value("--dtype").as_deref().unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => panic!("--dtype {other}: expected bf16, f16 or f32"),
    };
    let iters: usize = value("--iters").map_or(20, |v| v.parse().expect("--iters: a number"));
    let device = CudaDevice::default();
    // (rows, in, out): batch 8 x 1024 tokens through c_attn, attn c_proj, mlp c_fc, mlp c_proj
    // and the LM head; then one decode row (padded to two by nn::matmul) through c_fc.
    let shapes: [(usize, usize, usize); 6] = [
        (8192, 2048, 6144),
        (8192, 2048, 2048),
        (8192, 2048, 8192),
        (8192, 8192, 2048),
        (8192, 2048, 50688),
        (1, 2048, 8192),
    ];
    for (m, k, n) in shapes {
        let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
        // Linear's weight is [out, in], used through a transposed view; GPT-2's Conv1D is [in, out].
        let w_out_in = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 0.02), &device).cast(dtype);
        let w_in_out = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 0.02), &device).cast(dtype);
        for (layout, w) in [("conv1d [in, out]", w_in_out), ("linear [out, in]^T", w_out_in.transpose())] {
            let mut seconds = [0.0f64; ROUTES.len()];
            let mut products = Vec::new();
            for (i, route) in ROUTES.into_iter().enumerate() {
                llava_jp::cublaslt::set_route(route);
                // Warm-up: burn compiles and autotunes its kernels on first use of a shape.
                for _ in 0..3 {
                    let _ = matmul(x.clone(), w.clone());
                }
                B::sync(&device).expect("sync");
                let start = Instant::now();
                for _ in 0..iters {
                    let _ = matmul(x.clone(), w.clone());
                }
                B::sync(&device).expect("sync");
                seconds[i] = start.elapsed().as_secs_f64() / iters as f64;
                products.push(matmul(x.clone(), w.clone()).cast(DType::F32));
            }
            let diff = |j: usize| (products[0].clone() - products[j].clone()).abs().max().into_scalar();
            let scale = products[0].clone().abs().max().into_scalar();
            let tflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e12;
            println!(
                "{}",
                serde_json::json!({
                    "m": m, "k": k, "n": n, "layout": layout, "dtype": format!("{dtype:?}"),
                    "burn_ms": seconds[0] * 1e3, "cublaslt_ms": seconds[1] * 1e3, "cublaslt_sync_ms": seconds[2] * 1e3, "cublaslt_flags_ms": seconds[3] * 1e3,
                    "burn_tflops": tflops(seconds[0]), "cublaslt_tflops": tflops(seconds[1]),
                    "speedup": seconds[0] / seconds[1],
                    "max_abs_diff": diff(1), "max_abs_diff_sync": diff(2), "max_abs_diff_flags": diff(3), "max_abs_burn": scale,
                })
            );
        }
    }
}
