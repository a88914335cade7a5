//! Figures, not a test: the two ceilings of this CPU that the kernels are measured against, on
//! one core and on every core. The most int8 multiply-adds per second of its AVX-512 VNNI unit
//! (`vpdpbusd` on 512-bit vectors, 64 multiply-adds each, twelve independent chains with
//! nothing else to do), for the int8 products' GMAC/s (`int8_speed`); and the rate at which it
//! reads memory far larger than its caches, for a decode, which reads every weight once a
//! token. Then what bounds the int8 kernel's inner loop: eight `vpdpbusd` of two 64-byte code
//! vectors (two tiles) with four rows' activation quads, the quads broadcast by each product
//! from memory (eight 4-byte loads) or once per row into a register for both tiles (four),
//! with and without the two code loads.
//!
//! `cargo run --release -p strata-kernels --example cpu_peaks`

// A benchmark program: it prints.
#![allow(clippy::print_stdout)]
// The kernel's call, on a CPU checked to have its features, and its register barrier.
#![allow(unsafe_code)]

use std::time::Instant;

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    vnni(cores);
    memory(cores);
    loads();
}

/// The inner loop of the int8 tile kernel (two tiles, four rows), `rounds` times over the same
/// cache lines, in four forms: `loads` whether the two code vectors are loaded each round,
/// `shared` whether each row's quad is broadcast once into a register for both tiles (else
/// each product broadcasts it from memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
fn tile_loop(rounds: u64, quads: &[i32; 32], codes: &[u8; 128], loads: bool, shared: bool) {
    let (q, w) = (quads.as_ptr(), codes.as_ptr());
    // SAFETY: the blocks read only `quads` (at most 100 bytes in) and `codes` (128 bytes), and
    // write only the registers they name; the caller checked the CPU's features.
    unsafe {
        // The loop around `$load` (the code vectors' loads, or nothing) and `$body`.
        macro_rules! run {
            ($load:expr, $body:expr) => {
                std::arch::asm!(
                    "vmovdqu64 zmm8, [{w}]", "vmovdqu64 zmm13, [{w} + 64]",
                    "2:",
                    $load,
                    $body,
                    "dec {n}", "jnz 2b",
                    n = inout(reg) rounds => _, q = in(reg) q, w = in(reg) w,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                    out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
                    out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _,
                    options(nostack),
                )
            };
        }
        // Each product broadcasts its row's quad from memory.
        macro_rules! by_products {
            () => {
                concat!(
                    "vpdpbusd zmm0, zmm8, dword ptr [{q}]{{1to16}}\n",
                    "vpdpbusd zmm1, zmm8, dword ptr [{q} + 32]{{1to16}}\n",
                    "vpdpbusd zmm2, zmm8, dword ptr [{q} + 64]{{1to16}}\n",
                    "vpdpbusd zmm3, zmm8, dword ptr [{q} + 96]{{1to16}}\n",
                    "vpdpbusd zmm4, zmm13, dword ptr [{q}]{{1to16}}\n",
                    "vpdpbusd zmm5, zmm13, dword ptr [{q} + 32]{{1to16}}\n",
                    "vpdpbusd zmm6, zmm13, dword ptr [{q} + 64]{{1to16}}\n",
                    "vpdpbusd zmm7, zmm13, dword ptr [{q} + 96]{{1to16}}",
                )
            };
        }
        // Each row's quad broadcast once into a register, for both tiles.
        macro_rules! shared_registers {
            () => {
                concat!(
                    "vpbroadcastd zmm9, dword ptr [{q}]\n",
                    "vpbroadcastd zmm10, dword ptr [{q} + 32]\n",
                    "vpbroadcastd zmm11, dword ptr [{q} + 64]\n",
                    "vpbroadcastd zmm12, dword ptr [{q} + 96]\n",
                    "vpdpbusd zmm0, zmm8, zmm9\n",
                    "vpdpbusd zmm1, zmm8, zmm10\n",
                    "vpdpbusd zmm2, zmm8, zmm11\n",
                    "vpdpbusd zmm3, zmm8, zmm12\n",
                    "vpdpbusd zmm4, zmm13, zmm9\n",
                    "vpdpbusd zmm5, zmm13, zmm10\n",
                    "vpdpbusd zmm6, zmm13, zmm11\n",
                    "vpdpbusd zmm7, zmm13, zmm12",
                )
            };
        }
        // The two tiles' code vectors, loaded again.
        macro_rules! codes {
            () => {
                "vmovdqu64 zmm8, [{w}]\nvmovdqu64 zmm13, [{w} + 64]"
            };
        }
        match (loads, shared) {
            (false, false) => run!("", by_products!()),
            (true, false) => run!(codes!(), by_products!()),
            (false, true) => run!("", shared_registers!()),
            (true, true) => run!(codes!(), shared_registers!()),
        }
    }
}

/// The four forms of [`tile_loop`] on one core, best of three rounds each.
fn loads() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
        let (quads, codes) = ([1i32; 32], [1u8; 128]);
        let rounds = 50_000_000u64;
        for (loads, shared) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut best = 0.0f64;
            for _ in 0..3 {
                let t = Instant::now();
                // SAFETY: the features were detected above.
                unsafe { tile_loop(rounds, &quads, &codes, loads, shared) };
                best = best.max(8.0 * rounds as f64 / t.elapsed().as_secs_f64());
            }
            println!(
                "tile loop, {} code loads, quads broadcast {}: {:6.2} G vpdpbusd/s",
                if loads { "2" } else { "no" },
                if shared {
                    "once per row into a register (4 loads)"
                } else {
                    "by each product (8 loads)"
                },
                best / 1e9
            );
        }
    }
}

/// Twelve chains of `vpdpbusd`, `rounds` deep; their sum, so that they are computed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
fn chains(rounds: u64) -> i32 {
    use std::arch::x86_64::{
        _mm512_add_epi32, _mm512_dpbusd_epi32, _mm512_reduce_add_epi32, _mm512_set1_epi8,
        _mm512_set1_epi32,
    };
    let mut acc: [_; 12] = std::array::from_fn(|i| _mm512_set1_epi32(i as i32));
    let (mut b, c) = (_mm512_set1_epi8(1), _mm512_set1_epi8(2));
    for _ in 0..rounds {
        for a in &mut acc {
            *a = _mm512_dpbusd_epi32(*a, b, c);
        }
        // An input the compiler cannot see through, kept in its register (`black_box` would
        // send it through memory, and the chains would wait on the store's forwarding).
        // SAFETY: an empty template: the register is left as it is.
        unsafe { std::arch::asm!("/* {0} */", inout(zmm_reg) b, options(nomem, nostack)) };
    }
    let sum = acc
        .iter()
        .fold(_mm512_set1_epi32(0), |s, &a| _mm512_add_epi32(s, a));
    _mm512_reduce_add_epi32(sum)
}

/// The VNNI ceiling on 1 and on `cores` threads, best of three rounds each (other tenants of
/// the machine only slow a round down).
fn vnni(cores: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
        let rounds = 50_000_000u64;
        for threads in [1, cores] {
            for _ in 0..3 {
                let t = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        // SAFETY: the features were detected above.
                        s.spawn(|| std::hint::black_box(unsafe { chains(rounds) }));
                    }
                });
                let per_s = (12 * rounds * threads as u64) as f64 / t.elapsed().as_secs_f64();
                println!(
                    "{threads} thread(s): {:6.2} G vpdpbusd/s, {:7.1} GMAC/s",
                    per_s / 1e9,
                    per_s * 64.0 / 1e9
                );
            }
        }
        return;
    }
    let _ = cores;
    println!("this CPU has no AVX-512 VNNI");
}

/// Reads 512 MiB (far past any cache) four times over, split among 1 and then `cores`
/// threads, best of three rounds each.
fn memory(cores: usize) {
    let words = (512usize << 20) / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    for threads in [1, cores] {
        for _ in 0..3 {
            let t = Instant::now();
            let total = std::thread::scope(|s| {
                let parts: Vec<_> = data
                    .chunks(words.div_ceil(threads))
                    .map(|part| {
                        s.spawn(move || {
                            (0..4).fold(0u64, |acc, _| {
                                let sum = part.iter().fold(0u64, |a, &x| a.wrapping_add(x));
                                acc.wrapping_add(sum)
                            })
                        })
                    })
                    .collect();
                parts
                    .into_iter()
                    .map(|p| p.join().unwrap_or(0))
                    .fold(0u64, u64::wrapping_add)
            });
            std::hint::black_box(total);
            let bytes = 4.0 * (words * 8) as f64;
            println!(
                "{threads} thread(s): memory read at {:5.1} GB/s",
                bytes / t.elapsed().as_secs_f64() / 1e9
            );
        }
    }
}
