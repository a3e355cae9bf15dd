//! Attention on CUDA at the model's shapes: burn's fused attention against the flash kernel
//! (`src/flash.rs`), in one run, with the largest difference between the two outputs. Needs an
//! NVIDIA GPU; `model-import/scripts/bench_attention.py` times PyTorch's SDPA at the same shapes.
//!
//!     cargo bench --bench attention [-- --dtype bf16 --iters 20 --forward-only --flash-train-only
//!         --shapes train,prefill,clip,decode --dropout 0.1]
//!
//! Prints one JSON line per shape: milliseconds of each route and their ratio, for the forward
//! alone and for forward and backward (training; not for the decode shape).
use std::time::Instant;

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use llava_jp::model::gpt2::attention_mask;
use llava_jp::flash::{Backward, Route};
use llava_jp::model::nn::{attention, Dropout};

type B = Cuda<f32>;
type AD = Autodiff<Cuda<f32>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args.get(i + 1).unwrap_or_else(|| panic!("{flag} needs a value")).clone());
    let dtype = match value("--dtype").as_deref().unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => panic!("--dtype {other}: expected bf16 or f16 (the flash kernel's types)"),
    };
    let iters: usize = value("--iters").map_or(20, |v| v.parse().expect("--iters: a number"));
    // Forward only: skips the training timings (each compiles burn's backward kernels anew).
    let forward_only = args.iter().any(|a| a == "--forward-only");
    // Training timed through the flash kernels only: burn's backward kernels take minutes to
    // compile on a fresh machine, and their time does not change with ours.
    let flash_train_only = args.iter().any(|a| a == "--flash-train-only");
    // Shapes whose name contains one of these words (default: all).
    let wanted = value("--shapes");
    let device = CudaDevice::default();
    // (name, batch, heads, queries, keys, head_dim, causal): llm-jp-1.3b training and prefill
    // with GPT-2's causal mask (padding included), CLIP ViT-L/14-336's unmasked attention over
    // 577 tokens, and one decode query against a 600-token cache.
    let shapes = [
        ("llm train 8x1024", 8, 16, 1024, 1024, 128, true),
        ("llm train stage1 32x608", 32, 16, 608, 608, 128, true),
        ("llm prefill 1x600", 1, 16, 600, 600, 128, true),
        ("clip 8 images", 8, 16, 577, 577, 64, false),
        ("llm decode 1 vs 600", 1, 16, 1, 600, 128, true),
    ];
    let no_dropout = Dropout { prob: 0.0 };
    // Attention dropout in the training timings (GPT-2's `attn_pdrop`; llm-jp-1.3b trains with
    // 0.1): the flash kernels drop in place, burn's route writes the dropped scores out.
    let train_dropout = Dropout { prob: value("--dropout").map_or(0.0, |v| v.parse().expect("--dropout: a probability")) };
    for (name, b, h, tq, tk, d, causal) in shapes {
        if wanted.as_ref().is_some_and(|w| !w.split(',').any(|word| name.contains(word))) {
            continue;
        }
        let qkv = |t: usize| Tensor::<B, 4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
        let (q, k, v) = (qkv(tq), qkv(tk), qkv(tk));
        let mask = causal.then(|| attention_mask(Tensor::<B, 2, Bool>::full([b, tk], true, &device), tq, h));
        let scale = 1.0 / (d as f64).sqrt();
        let run = || attention(q.clone(), k.clone(), v.clone(), mask.clone(), scale, &no_dropout);
        let mut ms = [0.0f64; 2];
        let mut outputs = Vec::new();
        for (route, flash) in [(0, false), (1, true)] {
            llava_jp::flash::set_route(if flash { Route::Inference } else { Route::Burn });
            for _ in 0..3 {
                let _ = run();
            }
            B::sync(&device).expect("sync");
            let start = Instant::now();
            for _ in 0..iters {
                let _ = run();
            }
            B::sync(&device).expect("sync");
            ms[route] = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
            outputs.push(run().cast(DType::F32));
        }
        // Forward and backward, the gradient of the output's sum reaching q, k and v: burn's
        // route, the flash kernels with the fused backward, with the split pair.
        let mut train_ms = [f64::NAN; 3];
        if tq > 1 && !forward_only {
            let lift = |t: &Tensor<B, 4>| Tensor::<AD, 4>::from_inner(t.clone()).require_grad();
            let mask = mask.clone().map(Tensor::<AD, 4, Bool>::from_inner);
            let step = || {
                let (q, k, v) = (lift(&q), lift(&k), lift(&v));
                let grads = attention(q.clone(), k.clone(), v.clone(), mask.clone(), scale, &train_dropout).sum().backward();
                (q.grad(&grads), k.grad(&grads), v.grad(&grads))
            };
            for (route, flash) in [(0, false), (1, true), (2, true)] {
                if flash_train_only && !flash {
                    continue;
                }
                llava_jp::flash::set_route(if flash { Route::Training } else { Route::Burn });
                llava_jp::flash::set_backward(if route == 2 { Backward::Split } else { Backward::Fused });
                for _ in 0..3 {
                    let _ = step();
                }
                B::sync(&device).expect("sync");
                let start = Instant::now();
                for _ in 0..iters {
                    let _ = step();
                }
                B::sync(&device).expect("sync");
                train_ms[route] = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
            }
        }
        let diff = (outputs[0].clone() - outputs[1].clone()).abs().max().into_scalar();
        let scale_out = outputs[0].clone().abs().max().into_scalar();
        println!(
            "{}",
            serde_json::json!({
                "shape": name, "batch": b, "heads": h, "queries": tq, "keys": tk, "head_dim": d, "causal": causal,
                "dtype": format!("{dtype:?}"), "train_dropout": train_dropout.prob, "burn_ms": ms[0], "flash_ms": ms[1], "speedup": ms[0] / ms[1],
                "train_burn_ms": train_ms[0], "train_flash_ms": train_ms[1], "train_speedup": train_ms[0] / train_ms[1],
                "train_flash_split_backward_ms": train_ms[2],
                "max_abs_diff": diff, "max_abs_burn": scale_out,
            })
        );
    }
}
